"""Stage implementations: each reads upstream artifacts and writes its own folder."""
