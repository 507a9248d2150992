"""Tests of glisk.handlers: the image and upload stages against the Replicate and Pinata stand-ins."""
