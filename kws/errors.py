"""User-facing errors: the CLI prints these as one line and exits non-zero; anything else is a bug."""


class KWSError(Exception):
    """Base class for errors caused by the user's input, files or settings."""


class AudioError(KWSError):
    """An audio file cannot be read or holds no usable audio. The message names the file."""


class ConfigError(KWSError):
    """A recipe or setting is invalid. The message names the key."""


class DataError(KWSError):
    """A dataset folder or manifest is missing or malformed."""


class CacheError(KWSError):
    """A feature cache is missing, incomplete, or was made with other settings."""


class ModelError(KWSError):
    """A model file is missing, damaged, or not a kws checkpoint."""


class DeviceError(KWSError):
    """A sound device is missing, busy, or stopped delivering audio."""
