"""A small REST client for the test cluster's kube-apiserver (the process kubelet's only way to it).

Plain `requests` with the admin bearer token of tests/k8s/control_plane.py, verifying the server against the
certificate it generated for itself (its CA is in the same file). `watch` streams a watch as the API's JSON lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import requests


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, message: str):
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


class Api:
    def __init__(self, server: str, token: str, ca_file: str):
        self.server = server.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.verify = ca_file
        self.session.trust_env = False  # no proxy, no REQUESTS_CA_BUNDLE: loopback to the test cluster only

    def request(self, method: str, path: str, body: dict | None = None, params: dict | None = None,
                content_type: str = "application/json") -> dict:
        data = json.dumps(body) if body is not None else None
        r = self.session.request(method, self.server + path, data=data, params=params, timeout=30,
                                 headers={"Content-Type": content_type})
        if r.status_code >= 300:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise ApiError(method, path, r.status_code, message[:500])
        return r.json() if r.content else {}

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params or None)

    def find(self, path: str) -> dict | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, **params) -> dict:
        try:
            return self.request("DELETE", path, params=params or None)
        except ApiError as e:
            if e.status == 404:
                return {}
            raise

    def watch(self, path: str, resource_version: str, timeout_s: int = 30, **params) -> Iterator[dict]:
        """The watch events ({type, object}) after `resource_version`, until the server ends the watch."""
        query = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": str(timeout_s),
                 "allowWatchBookmarks": "true", **params}
        with self.session.get(self.server + path, params=query, stream=True, timeout=timeout_s + 10) as r:
            if r.status_code >= 300:
                raise ApiError("WATCH", path, r.status_code, r.text[:500])
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)
