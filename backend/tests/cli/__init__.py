"""Tests of glisk.cli run as an operator runs it: `glisk serve` (one or several API processes),
`glisk db`."""
