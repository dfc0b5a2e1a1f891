"""The commands beside the proxy: the demo, the audit and the toy payments API.

None of them is on the request path; they show what the proxy is for (`demo`), find out
whether an API needs it (`audit`), and play the kind of API it protects (`legacy-api`).
Each tool module owns its command: `add_parser(commands)` declares the subcommand and its
options, and `run(args)` does the work and returns the exit status, so `proxy.cli` only
dispatches.
"""
