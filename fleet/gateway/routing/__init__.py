"""Which engine takes a request, in one place: a model looked up by its name (`lookup`: 404, or
503 while none of its replicas serves), the keys a request carries (`keys`: its session's, its
prompt's prefix), the policies that choose a replica (`policies`: pure functions over plain data,
tested without processes) and a model's replicas with the routed engine request, which fails over
to another replica when one refuses it before any work began (`replicas`), and is taken over by
another when its engine dies under it (`resume`: run again, or a stream continued token-exactly).

A new routing policy: its name in `fleet.config.model.RoutingPolicy` (the fleet file's field), its
function in `policies` and its branch in `policies.choose`; a key it needs, in `keys`.

May import: fleet.gateway.metrics, fleet.gateway.recent, fleet.api.answers, fleet.wire, fleet.config,
fleet.lifecycle, fleet.errors.
"""
