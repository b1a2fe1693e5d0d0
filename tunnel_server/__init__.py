"""The relay: authenticates WebSocket tunnels, authorizes them, forwards TCP to private targets."""
