"""Tests of glisk.repositories and glisk.uow: repositories, units of work, row locks across
connections and processes, mint recording."""
