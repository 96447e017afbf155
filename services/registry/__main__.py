"""`python -m services.registry` runs the registry service."""

import asyncio

from services.registry.main import main

asyncio.run(main())
