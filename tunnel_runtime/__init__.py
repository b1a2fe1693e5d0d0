"""The process runtime shared by the client and the server (neither imports the other): the
event loop (uvloop where installed, named by ``loop_name``) and glibc malloc tuning (``loop``),
and bridging two aiohttp WebSockets (``wsbridge``)."""
