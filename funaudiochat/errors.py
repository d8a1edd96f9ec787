"""Error hierarchy. Every message says what was wrong and, where possible, how to fix it."""


class FunAudioChatError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FunAudioChatError, ValueError):
    """A configuration file or value is invalid (the message names the field)."""


class CheckpointError(FunAudioChatError):
    """A checkpoint is missing, unreadable, or does not fit the model (names the tensors)."""


class InputError(FunAudioChatError, ValueError):
    """User input (audio, text, request) cannot be used; the message says why."""


class StorageError(FunAudioChatError):
    """An output could not be written (disk full, permission denied); the message names the path."""


class ContextLengthError(InputError):
    """A prompt does not fit in the model's context window."""


class CacheOverflowError(FunAudioChatError):
    """A KV cache would be written past its allocated length."""


class ProtocolError(FunAudioChatError):
    """A client sent a malformed or out-of-order message."""


class SessionClosedError(FunAudioChatError):
    """An operation was attempted on a closed or cancelled session."""
