"""Query routers (requests -> whole models), one file each; their registry is apart from the token routers'."""

from routelab.query.routers import (  # noqa: F401  (importing registers each router)
    cascade,
    cluster,
    knn,
    linucb,
    mf,
    mlp,
    oracle,
    random,
    single,
    sw_ranking,
)
from routelab.query.routers.base import (
    QueryRouter,
    create_router,
    list_routers,
    load_router,
    register_query_router,
)

__all__ = ["QueryRouter", "create_router", "list_routers", "load_router", "register_query_router"]
