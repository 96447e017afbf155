"""`python -m services.automation` runs the automation service."""

import asyncio

from services.automation.main import main

asyncio.run(main())
