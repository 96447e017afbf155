"""`python -m services.profiler` runs the profiler service."""

import asyncio

from services.profiler.main import main

asyncio.run(main())
