"""The Docker Engine API, in one place: the client (hosts, contexts, TLS, version negotiation, errors people
can act on), what it holds of images, and the docker-archive writer. Used by dao pull, dao clean and the
agent; no feature reaches the engine another way."""

from dao.engine.client import DEFAULT_HOST, Engine, EngineError, EngineInfo, go_arch, resolve_host

__all__ = ["DEFAULT_HOST", "Engine", "EngineError", "EngineInfo", "go_arch", "resolve_host"]
