"""berth's metadata: a sqlite database of namespaced objects over shared backends (content, snapshots).

:mod:`.db` opens the database and runs its schema migrations; :mod:`.namespaces`, :mod:`.content`,
:mod:`.images`, :mod:`.snapshots` and :mod:`.leases` are the namespaced stores; :mod:`.gc` is the
mark-and-sweep collector.
"""
