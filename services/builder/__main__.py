"""`python -m services.builder` runs the builder service."""

import asyncio

from services.builder.main import main

asyncio.run(main())
