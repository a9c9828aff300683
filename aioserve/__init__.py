"""aioserve: serve Python models and functions from a single asyncio process.

The legacy Ray Serve backend/endpoint API on one event loop: ``import aioserve as serve``.
"""

from __future__ import annotations

from ._types import Lifecycle
from .api import (
    backend_statistics,
    connect,
    create_backend,
    create_endpoint,
    delete_backend,
    delete_endpoint,
    get_backend_config,
    get_handle,
    init,
    link,
    list_backends,
    list_endpoints,
    route,
    set_backend_config,
    set_traffic,
    shadow_traffic,
    shutdown,
    split,
    start,
    stat,
    update_backend_config,
)
from .batching import accept_batch, batch
from .callable import PythonRequest
from .client import Client, RayServeSyncHandle, SyncServeHandle
from .config import BackendConfig, BackendInfo, DeploymentMode, HTTPOptions
from .context import ReplicaContext, context, get_replica_context
from .exceptions import (
    BackendError,
    BackendInUse,
    BackendNotFound,
    BatchError,
    BindError,
    BodyTooLarge,
    ConfigError,
    ConfigTypeError,
    DeadlineExceeded,
    DeploymentError,
    EndpointNotFound,
    MethodNotFound,
    NoTraffic,
    Overloaded,
    RayServeException,
    ReplicaStopped,
    RouteConflict,
    ServeError,
    ServeShutdown,
    StoreError,
)
from .handle import RayServeHandle, ServeFuture, ServeHandle
from .inbox import ServeRequest
from .ingress import ingress
from .metrics import BackendStatistics
from .policy import RoutePolicy
from .serve import Serve

__version__ = "0.1.0"

__all__ = [
    "BackendConfig",
    "BackendError",
    "BackendInUse",
    "BackendInfo",
    "BackendNotFound",
    "BackendStatistics",
    "BatchError",
    "BindError",
    "BodyTooLarge",
    "Client",
    "ConfigError",
    "ConfigTypeError",
    "DeadlineExceeded",
    "DeploymentError",
    "DeploymentMode",
    "EndpointNotFound",
    "HTTPOptions",
    "Lifecycle",
    "MethodNotFound",
    "NoTraffic",
    "Overloaded",
    "PythonRequest",
    "RayServeException",
    "RayServeHandle",
    "RayServeSyncHandle",
    "ReplicaContext",
    "ReplicaStopped",
    "RouteConflict",
    "RoutePolicy",
    "Serve",
    "ServeError",
    "ServeFuture",
    "ServeHandle",
    "ServeRequest",
    "ServeShutdown",
    "StoreError",
    "SyncServeHandle",
    "__version__",
    "accept_batch",
    "backend_statistics",
    "batch",
    "connect",
    "context",
    "create_backend",
    "create_endpoint",
    "delete_backend",
    "delete_endpoint",
    "get_backend_config",
    "get_handle",
    "get_replica_context",
    "ingress",
    "init",
    "link",
    "list_backends",
    "list_endpoints",
    "route",
    "set_backend_config",
    "set_traffic",
    "shadow_traffic",
    "shutdown",
    "split",
    "start",
    "stat",
    "update_backend_config",
]
