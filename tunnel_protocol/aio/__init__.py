"""The asyncio + websockets drivers around the sans-I/O core: byte streams and the pump."""
