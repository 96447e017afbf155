"""A webhook receiver that turns mlmesh events into GitHub repository_dispatch events.

mlmesh's notifier signs every delivery (Standard Webhooks); this relay verifies the signature,
drops deliveries it has seen (at-least-once delivery means retries may repeat one), and for
`model.promoted` calls GitHub's API, which needs a token the notifier does not hold:

    POST {GITHUB_API_URL, default https://api.github.com}/repos/{GITHUB_REPOSITORY}/dispatches
    {"event_type": "mlmesh-model-promoted", "client_payload": <the event's data>}

Run it with the standard library and the `standardwebhooks` package:

    MLMESH_WEBHOOK_SECRET=whsec_... GITHUB_TOKEN=... GITHUB_REPOSITORY=owner/repo \
        python webhook_relay.py --port 8080
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

EVENT_TYPES = {"io.mlmesh.model.promoted.v1": "mlmesh-model-promoted"}
SEEN_LIMIT = 10_000


def dispatch(event_type: str, payload: dict) -> int:
    request = urllib.request.Request(
        f"{os.environ.get('GITHUB_API_URL', 'https://api.github.com')}/repos/{os.environ['GITHUB_REPOSITORY']}/dispatches",
        data=json.dumps({"event_type": event_type, "client_payload": payload}).encode(),
        headers={
            "Authorization": f"Bearer {os.environ['GITHUB_TOKEN']}",
            "Accept": "application/vnd.github+json",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    arguments = parser.parse_args()
    verifier = Webhook(os.environ["MLMESH_WEBHOOK_SECRET"])
    seen: OrderedDict[str, None] = OrderedDict()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                event = verifier.verify(body, {key.lower(): value for key, value in self.headers.items()})
            except WebhookVerificationError:
                self.send_response(401)
                self.end_headers()
                return
            webhook_id = self.headers["webhook-id"]
            if webhook_id not in seen:
                github_type = EVENT_TYPES.get(event.get("type", ""))
                if github_type:
                    try:
                        dispatch(github_type, event.get("data", {}))
                    except OSError:
                        self.send_response(502)  # mlmesh retries it later
                        self.end_headers()
                        return
                seen[webhook_id] = None
                if len(seen) > SEEN_LIMIT:
                    seen.popitem(last=False)
            self.send_response(204)
            self.end_headers()

    ThreadingHTTPServer((arguments.host, arguments.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
