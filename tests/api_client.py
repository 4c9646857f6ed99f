"""An admin API client for tests that checks every answer against /openapi.json."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonschema
import orjson

from dispatcher.openapi import document

_DOC = document()


def conforms(instance: Any, component: str) -> None:
    """Raise unless `instance` matches the named schema of the OpenAPI document."""
    schema = {"$ref": f"#/components/schemas/{component}", "components": _DOC["components"]}
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(instance)


@dataclass
class Answer:
    status: int
    body: Any


@dataclass
class Client:
    http: aiohttp.ClientSession
    base: str
    token: str | None

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        schema: str | None = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Answer:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data: Any = (
            io.BytesIO(raw) if raw is not None else (None if json is None else orjson.dumps(json))
        )
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(
            method, self.base + path, data=data, headers=headers, params=params
        ) as response:
            text = await response.read()
            body = orjson.loads(text) if text else None
            if response.status >= 400:
                assert response.content_type == "application/json", text
                conforms(body, "Error")
            elif schema is not None:
                conforms(body, schema)
            return Answer(response.status, body)

    async def get(self, path: str, schema: str | None = None, **params: str) -> Answer:
        return await self.call("GET", path, schema=schema, params=params or None)

    async def post(self, path: str, json: Any = None, schema: str | None = None) -> Answer:
        return await self.call("POST", path, json if json is not None else {}, schema=schema)

    async def patch(self, path: str, json: Any, schema: str | None = None) -> Answer:
        return await self.call("PATCH", path, json, schema=schema)

    async def delete(self, path: str) -> Answer:
        return await self.call("DELETE", path)


async def wait_status(client: Client, delivery_id: int, status: str, timeout: float = 10) -> Any:
    """The delivery's detail once its status is `status`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await client.get(f"/v1/deliveries/{delivery_id}", "DeliveryDetail")
        if answer.body["status"] == status:
            return answer.body
        assert time.monotonic() < deadline, answer.body
        await asyncio.sleep(0.05)
