# The development OpenID Connect provider (deploy/dev-idp) for the compose cluster only: public
# passwords, keys in memory. Build context: the repository root.
FROM node:20-bookworm-slim
WORKDIR /idp
COPY deploy/dev-idp/package.json deploy/dev-idp/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error
COPY deploy/dev-idp/server.js ./
USER node
ENTRYPOINT ["node", "server.js"]
