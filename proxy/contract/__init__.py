"""The proxy's contract with its clients, published (issue: the IETF idempotency-key draft
says a resource MUST publish its idempotency policy).

`describe` turns a config into what each route asks of its clients and answers them
(markdown, OpenAPI 3.1); `paths` decides which routes govern an OpenAPI path template;
`merge` adds the contract to the upstream's own OpenAPI document; `documents` reads and
writes JSON and YAML. All of it is pure: a config and a document in, a document out.
"""
