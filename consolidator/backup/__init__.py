"""Backups: the backup directory's files (:mod:`.repo`) and the retention rules
(:mod:`.retention`, pure). The supervisor takes them (:mod:`consolidator.daemon.recovery`)."""
