"""An in-process Kubernetes API for the KubeRay backend's client path: kmock served on 127.0.0.1.

No kube-apiserver can run here, so the official `kubernetes` client talks to kmock's in-memory emulator, which
serves the API's shape (CRUD and watch, ray.io/v1 RayJobs included). kmock is no controller: a test plays the
KubeRay operator and writes a RayJob's status itself.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kmock

from tuneplane.backends.kuberay import GROUP, PLURAL, VERSION


class _KubeApi(kmock.KubernetesEmulator):
    """kmock's in-memory Kubernetes API with the three fixes the official client needs: 201 on create (the
    client only decodes a create response declared as 201), `/version/` with the slash the client uses, and
    the resources declared so that listing and watching work before the first object exists."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /version/"] << self._serve_server_version
        self.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
            kind="RayJob", singular="rayjob", namespaced=True, subresources={"status"}
        )
        self.resources["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True)
        self.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True, subresources={"log"})

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return kmock.Response(status=201, payload=await super()._serve_create(request))


class KubeApiServer:
    """kmock served on 127.0.0.1 (free port) from its own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kmock", daemon=True)
        self.thread.start()
        self.handler, self.server = self._run(self._start())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> tuple[_KubeApi, kmock.Server]:
        handler = _KubeApi()
        server = kmock.Server(handler, host="127.0.0.1")
        await handler.__aenter__()
        await server.__aenter__()
        return handler, server

    def react(self, request: str, payload: Any) -> None:
        """Add a reaction (e.g. a fixed response for one URL), from inside the server's loop."""

        async def add() -> None:
            self.handler[request] << payload

        self._run(add())

    def watchers(self) -> int:
        """Open watches of RayJobs."""
        return self.handler._buses[kmock.resource(GROUP, VERSION, PLURAL)].consumer_count

    def stop(self) -> None:
        async def stop() -> None:
            await self.server.__aexit__(None, None, None)
            await self.handler.__aexit__(None, None, None)

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
