"""`python -m services.runtime` runs the inference server."""

import asyncio

from services.runtime.main import main

asyncio.run(main())
