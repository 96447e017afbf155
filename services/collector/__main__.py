"""`python -m services.collector` runs the collector service."""

import asyncio

from services.collector.main import main

asyncio.run(main())
