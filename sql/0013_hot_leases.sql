-- Leases apart from due times (issue 17). A claim used to push due_at to the end of its
-- lease; due_at is indexed (the claim's own index), so every claim wrote a new row version
-- and an entry in each of the table's indexes, and its WAL. The lease end now has its own
-- column, in no index and no index predicate, and the table keeps 60% of each page free:
-- a claim's update is a heap-only tuple (HOT) update on the row's own page. A claimed row
-- grows by its lease (24 bytes) and a claim that takes a whole page needs room there for
-- every new version (at half free, one in eight went to another page). due_at stays
-- the time the delivery is due; a row is claimable when it is due and its lease (if any)
-- has ended, so a row whose instance died comes back by itself as before. Its effective
-- due time is greatest(due_at, leased_until) (greatest ignores a NULL).
--
-- The claim's index scan now reads past the rows in flight (leased, still due), a heap
-- fetch each: on one busy endpoint's backlog that is a few hundred per claim, against the
-- four index entries and the new row version each claimed row cost.
ALTER TABLE dispatcher.deliveries ADD COLUMN leased_until timestamptz;
-- New pages only; pages written before fill up as rows are deleted and inserted.
ALTER TABLE dispatcher.deliveries SET (fillfactor = 40);

-- Rows leased when this runs keep their lease (their due_at is its end, as before).
UPDATE dispatcher.deliveries SET leased_until = due_at WHERE lease_owner IS NOT NULL;
