"""What the tests share and never test themselves: the suite's database, builders and seeding, API
and process helpers, and the entry points of the processes multi-process tests start."""
