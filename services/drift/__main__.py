"""`python -m services.drift` runs the drift service."""

import asyncio

from services.drift.main import main

asyncio.run(main())
