"""Support shared by the test suite and the benchmarks in bench/.

Both start the same real things on loopback: free ports, a counting upstream, redis-server
processes, the proxy in-process or as a process; both scrape its metrics and send it keyed
requests. One copy of each lives here so that a fix (a start-up race, a new config field)
reaches every test and every benchmark at once.

It lives under tests/ because it is test code that must never ship in the wheel (only
`proxy*` is packaged), and it is importable as `tests.support` from the repository root:
pytest puts the root on sys.path (tests/ is a package), and the bench/ scripts run as
`python -m bench.<name>` from the root.

    ports         free loopback ports
    waiting       wait_until (and wait_until_sync): poll a condition, never sleep a guess
    upstream      the counting upstream that plays the legacy API, and signals arrivals
    processes     ChildProcess: what the launchers below share (pid, alive)
    redis_server  RedisServer: a redis-server of our own (stop, kill, freeze, config lines)
    proxies       test configs, the proxy in-process, and the proxy as a process
    metrics       /metrics scraped into samples
    requests      keys, one request with its answer, problem+json checks, the replay check
    raw_http      requests written and answers read byte by byte on a raw socket
"""
