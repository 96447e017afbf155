"""`python -m services.notifier` runs the notifier."""

import asyncio

from services.notifier.main import main

asyncio.run(main())
