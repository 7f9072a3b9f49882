"""The library: models, parallel layers, optimizer, data. Reads no command-line arguments."""


class ConfigError(ValueError):
    """A configuration a user chose that cannot work.

    Messages name fields as ``field_name=value`` so that the command-line layer can show
    them as ``--field-name value``; they say what was expected in the same sentence.
    """
