"""Typed errors for bad input. Each is a ``ValueError`` (so ``except ValueError`` keeps working) whose message
names the input, what is wrong with it and how to fix it; the command line turns every one into exit code 2
and a one-line message, before any expensive work where the check allows it."""

from __future__ import annotations


class ContextlabError(ValueError):
    """Base class of contextlab's input errors."""


class DeviceError(ContextlabError):
    """The device asked for does not exist on this machine (``cuda`` without CUDA, ``cuda:3`` on one GPU)."""


class ContextFileError(ContextlabError):
    """A context or haystack file that is not text (NUL bytes, invalid UTF-8)."""


class MemoryEstimateError(ContextlabError):
    """A run whose estimated memory exceeds what the device has; the message carries the estimate."""
