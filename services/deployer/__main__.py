"""`python -m services.deployer` runs the deployer service."""

import asyncio

from services.deployer.main import main

asyncio.run(main())
