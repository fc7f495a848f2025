"""The pure core: plain values and the rules that combine them. No I/O, no asyncio, no
aiohttp, paho or loguru; the shells around it (the package's other modules) do the I/O."""
