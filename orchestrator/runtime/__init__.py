"""The only code that imports Ray: the launcher (Ray Train), the search launcher (Ray Tune), the Jobs API client,
and, in :mod:`.shortcuts`, the Ray internals that cut start-up, behind a version check."""
