"""Tests of the deployment files: .env.example, docker-compose.yml, .dockerignore, the container
entrypoint."""
