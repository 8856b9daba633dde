public import Logging
import PostgresNIO

/// One schema change, applied once, in order; the pending ones apply together in one transaction.
public struct Migration: Sendable {
  public let version: Int
  public let name: String
  public let statements: [String]
}

/// Applies the schema. Replicas may start together: the whole run holds a transaction-level
/// advisory lock, so one replica migrates while the others wait and then find nothing to do.
public enum Migrator {
  /// Arbitrary constant identifying Tollgate's migration lock ("tollgate" in ASCII).
  static let lockKey: Int64 = 0x746f_6c6c_6761_7465

  /// Applies every migration not yet recorded in `schema_migrations`. Returns the versions applied.
  @discardableResult
  public static func migrate(_ database: Database, logger: Logger) async throws(StoreError) -> [Int] {
    // A migration may legitimately run long (an index on a big table), so it is not bounded by
    // the operation timeout; but a database that is not there at all fails fast.
    guard await database.isReachable(logger: logger) else {
      throw .unavailable("database \(database.redactedURL) did not answer within \(database.operationTimeout)")
    }
    do {
      return try await database.client.withConnection { connection in
        try await connection.withTransaction(logger: logger) { connection in
          try await connection.query("SELECT pg_advisory_xact_lock(\(lockKey))", logger: logger)
          try await connection.query(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
              version integer PRIMARY KEY,
              name text NOT NULL,
              applied_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            logger: logger
          )
          var applied: Set<Int> = []
          for try await version in try await connection.query("SELECT version FROM schema_migrations", logger: logger)
            .decode(Int.self)
          {
            applied.insert(version)
          }
          var done: [Int] = []
          for migration in all where !applied.contains(migration.version) {
            logger.info("applying migration", metadata: ["version": "\(migration.version)", "name": "\(migration.name)"])
            for statement in migration.statements {
              try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
            }
            try await connection.query(
              "INSERT INTO schema_migrations (version, name) VALUES (\(migration.version), \(migration.name))",
              logger: logger
            )
            done.append(migration.version)
          }
          return done
        }
      }
    } catch {
      throw StoreError.classify(error)
    }
  }

  /// Row-level security for a tenant-owned table (one with a `tenant_id` column): only a
  /// transaction switched to `tollgate_tenant` sees and writes the current tenant's rows, only one
  /// switched to `tollgate_platform` sees all, and any other role sees nothing.
  ///
  /// FORCE makes RLS apply to the table owner too. A policy `TO role` also applies to members of
  /// the role, and the login user is a member of both (it must be, to SET ROLE), so each policy
  /// also checks current_user: only a transaction that actually switched role matches. The tenant
  /// setting is read in a sub-select, so once per statement.
  static func tenantOwned(_ table: String) -> [String] {
    [
      "ALTER TABLE \(table) ENABLE ROW LEVEL SECURITY",
      "ALTER TABLE \(table) FORCE ROW LEVEL SECURITY",
      """
      CREATE POLICY tenant_isolation ON \(table) TO tollgate_tenant
        USING ((SELECT current_user) = 'tollgate_tenant'
               AND tenant_id = (SELECT current_setting('tollgate.tenant_id', true)))
        WITH CHECK ((SELECT current_user) = 'tollgate_tenant'
               AND tenant_id = (SELECT current_setting('tollgate.tenant_id', true)))
      """,
      """
      CREATE POLICY platform_access ON \(table) TO tollgate_platform
        USING ((SELECT current_user) = 'tollgate_platform')
        WITH CHECK ((SELECT current_user) = 'tollgate_platform')
      """,
    ]
  }

  /// The schema, oldest first. Never edit an applied migration; add a new one.
  public static let all: [Migration] = [
    Migration(
      version: 1,
      name: "roles, tenants and certificate revocations",
      statements: [
        // Privilege-dropping roles. Cluster-wide, so create only if missing; another database
        // migrating at the same moment may win the race, which is fine.
        """
        DO $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollgate_tenant') THEN
            BEGIN
              CREATE ROLE tollgate_tenant NOLOGIN NOSUPERUSER NOBYPASSRLS;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END;
          END IF;
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollgate_platform') THEN
            BEGIN
              CREATE ROLE tollgate_platform NOLOGIN NOSUPERUSER NOBYPASSRLS;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END;
          END IF;
        END
        $$
        """,
        // The login user must be able to SET ROLE to both (a superuser already can).
        """
        DO $$
        BEGIN
          IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE format('GRANT tollgate_tenant, tollgate_platform TO %I', current_user);
          END IF;
        END
        $$
        """,
        """
        CREATE TABLE tenants (
          tenant_id text PRIMARY KEY CHECK (tenant_id ~ '^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$'),
          display_name text NOT NULL,
          state text NOT NULL CHECK (state IN ('active', 'suspended')),
          suspend_reason text NOT NULL DEFAULT '',
          quota jsonb NOT NULL,
          create_time timestamptz NOT NULL DEFAULT now(),
          update_time timestamptz NOT NULL DEFAULT now()
        )
        """,
      ] + tenantOwned("tenants") + [
        """
        CREATE TABLE certificate_revocations (
          revocation_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
          kind text NOT NULL CHECK (kind IN ('serial', 'fingerprint')),
          value text NOT NULL CHECK (value ~ '^[0-9a-f]+$'),
          tenant_id text REFERENCES tenants (tenant_id),
          reason text NOT NULL,
          revoked_by text NOT NULL,
          create_time timestamptz NOT NULL DEFAULT now()
        )
        """,
        // One revocation per certificate and scope ('' stands for "every tenant").
        """
        CREATE UNIQUE INDEX certificate_revocations_target
          ON certificate_revocations (kind, value, (coalesce(tenant_id, '')))
        """,
      ] + tenantOwned("certificate_revocations") + [
        "GRANT USAGE ON SCHEMA public TO tollgate_tenant, tollgate_platform",
        "GRANT SELECT ON tenants TO tollgate_tenant",
        "GRANT SELECT, INSERT ON certificate_revocations TO tollgate_tenant",
        "GRANT SELECT, INSERT, UPDATE ON tenants TO tollgate_platform",
        "GRANT SELECT, INSERT ON certificate_revocations TO tollgate_platform",
      ]
    ),
    Migration(
      version: 2,
      name: "per-log audit trees: leaves, perfect-subtree nodes, signed checkpoints",
      statements: [
        // One row per log: its size and compact range (the perfect subtree roots of its right
        // edge, 32 bytes each, largest first). Appenders lock this row, which serialises appends
        // to one log across every replica and keeps indices gap-free: a transaction that takes
        // index n commits (or rolls back its claim) before the next appender reads the size.
        """
        CREATE TABLE audit_logs (
          tenant_id text PRIMARY KEY,
          size bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
          compact_range bytea NOT NULL DEFAULT ''::bytea
        )
        """,
        // The exact leaf bytes, plus columns copied out of the event for filtering only; the
        // tree covers `leaf` alone.
        """
        CREATE TABLE audit_leaves (
          tenant_id text NOT NULL,
          leaf_index bigint NOT NULL CHECK (leaf_index >= 0),
          leaf bytea NOT NULL,
          event_time timestamptz NOT NULL,
          method text NOT NULL,
          principal text NOT NULL,
          outcome integer NOT NULL,
          PRIMARY KEY (tenant_id, leaf_index)
        )
        """,
        // Hashes of every perfect subtree (level 0 = leaf hashes), written once when completed.
        // Proofs read O(log² n) of these instead of rehashing leaves.
        """
        CREATE TABLE audit_nodes (
          tenant_id text NOT NULL,
          level smallint NOT NULL CHECK (level >= 0 AND level < 64),
          node_index bigint NOT NULL CHECK (node_index >= 0),
          hash bytea NOT NULL CHECK (length(hash) = 32),
          PRIMARY KEY (tenant_id, level, node_index)
        )
        """,
        // Signed checkpoints, kept forever with the public key that signed them, so a key
        // rotation leaves every earlier checkpoint verifiable.
        """
        CREATE TABLE audit_checkpoints (
          tenant_id text NOT NULL,
          tree_size bigint NOT NULL CHECK (tree_size >= 0),
          root_hash bytea NOT NULL CHECK (length(root_hash) = 32),
          key_name text NOT NULL,
          public_key bytea NOT NULL CHECK (length(public_key) = 32),
          signed_note text NOT NULL,
          create_time timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (tenant_id, tree_size)
        )
        """,
      ] + tenantOwned("audit_logs") + tenantOwned("audit_leaves") + tenantOwned("audit_nodes")
        + tenantOwned("audit_checkpoints") + [
          "GRANT SELECT, INSERT, UPDATE ON audit_logs TO tollgate_tenant, tollgate_platform",
          "GRANT SELECT, INSERT ON audit_leaves, audit_nodes, audit_checkpoints TO tollgate_tenant, tollgate_platform",
        ]
    ),
    Migration(
      version: 3,
      name: "metering: meters, raw usage events, monthly event counts",
      statements: [
        """
        CREATE TABLE meters (
          tenant_id text NOT NULL,
          name text NOT NULL CHECK (name ~ '^[a-z0-9_.-]{1,64}$'),
          aggregation text NOT NULL CHECK (aggregation IN ('sum', 'count', 'max', 'unique_count', 'latest')),
          value_property text NOT NULL DEFAULT '',
          group_by text[] NOT NULL DEFAULT '{}',
          description text NOT NULL DEFAULT '',
          create_time timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (tenant_id, name)
        )
        """,
        // Raw events, one per (tenant, source, id): the primary key is the idempotency rule.
        // ingest_seq orders events ingested with the same time, for LATEST.
        """
        CREATE TABLE usage_events (
          tenant_id text NOT NULL,
          source text NOT NULL,
          event_id text NOT NULL,
          meter text NOT NULL,
          subject text NOT NULL,
          event_time timestamptz NOT NULL,
          value double precision NOT NULL,
          properties jsonb NOT NULL DEFAULT '{}',
          ingest_seq bigint GENERATED ALWAYS AS IDENTITY,
          PRIMARY KEY (tenant_id, source, event_id)
        )
        """,
        // Time-range reads of one meter (a page of windows), and one subject's usage, which
        // with the value included needs no table read for SUM, COUNT and MAX.
        "CREATE INDEX usage_events_by_time ON usage_events (tenant_id, meter, event_time)",
        "CREATE INDEX usage_events_by_subject ON usage_events (tenant_id, meter, subject, event_time) INCLUDE (value)",
        // Events accepted per UTC month, spread over shards so concurrent batches of one tenant
        // do not wait on one row; the month's total is the sum.
        """
        CREATE TABLE usage_monthly (
          tenant_id text NOT NULL,
          month date NOT NULL,
          shard smallint NOT NULL CHECK (shard >= 0 AND shard < 16),
          events bigint NOT NULL CHECK (events >= 0),
          PRIMARY KEY (tenant_id, month, shard)
        )
        """,
      ] + tenantOwned("meters") + tenantOwned("usage_events") + tenantOwned("usage_monthly") + [
        "GRANT SELECT, INSERT, UPDATE ON meters, usage_events, usage_monthly TO tollgate_tenant, tollgate_platform",
      ]
    ),
    Migration(
      version: 4,
      name: "workflow runs, their state history, and leases",
      statements: [
        // One row per run. A lease is (lease_id, lease_expires) on a RUNNING row: each attempt gets
        // a new lease_id, so a worker's late result for an expired attempt matches nothing.
        """
        CREATE TABLE workflow_runs (
          tenant_id text NOT NULL,
          run_id uuid NOT NULL,
          type text NOT NULL CHECK (type ~ '^[A-Za-z0-9_.:-]{1,64}$'),
          payload bytea NOT NULL,
          idempotency_key text,
          priority smallint NOT NULL CHECK (priority BETWEEN -100 AND 100),
          run_after timestamptz NOT NULL,
          max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
          attempt integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
          state text NOT NULL CHECK (state IN ('pending_approval', 'queued', 'running', 'succeeded', 'failed',
                                                'dead', 'cancelled', 'rejected')),
          required_approver text NOT NULL DEFAULT '',
          approval_reason text NOT NULL DEFAULT '',
          decided_by text NOT NULL DEFAULT '',
          decision_comment text NOT NULL DEFAULT '',
          result bytea NOT NULL DEFAULT ''::bytea,
          last_error text NOT NULL DEFAULT '',
          lease_id uuid,
          lease_expires timestamptz,
          worker text NOT NULL DEFAULT '',
          seq bigint GENERATED ALWAYS AS IDENTITY,
          create_time timestamptz NOT NULL DEFAULT now(),
          update_time timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (tenant_id, run_id),
          CHECK ((state = 'running') = (lease_id IS NOT NULL AND lease_expires IS NOT NULL))
        )
        """,
        """
        CREATE UNIQUE INDEX workflow_runs_idempotency ON workflow_runs (tenant_id, idempotency_key)
          WHERE idempotency_key IS NOT NULL
        """,
        // The claim: ready runs of the worker's types, best first.
        """
        CREATE INDEX workflow_runs_ready ON workflow_runs (tenant_id, type, priority DESC, run_after, seq)
          WHERE state IN ('queued', 'failed')
        """,
        "CREATE UNIQUE INDEX workflow_runs_lease ON workflow_runs (tenant_id, lease_id) WHERE lease_id IS NOT NULL",
        "CREATE INDEX workflow_runs_expiry ON workflow_runs (lease_expires) WHERE state = 'running'",
        "CREATE INDEX workflow_runs_running ON workflow_runs (tenant_id, type) WHERE state = 'running'",
        "CREATE INDEX workflow_runs_newest ON workflow_runs (tenant_id, seq DESC)",
        // Every state change, written by the trigger below whatever code path made it, so the
        // history WatchRun streams cannot miss one.
        """
        CREATE TABLE workflow_run_events (
          tenant_id text NOT NULL,
          run_id uuid NOT NULL,
          event_seq bigint GENERATED ALWAYS AS IDENTITY,
          previous_state text,
          state text NOT NULL,
          attempt integer NOT NULL,
          last_error text NOT NULL,
          event_time timestamptz NOT NULL DEFAULT clock_timestamp(),
          PRIMARY KEY (tenant_id, run_id, event_seq)
        )
        """,
        // Who is watching which run (WatchRun), so that state changes nobody needs to hear of
        // (a claim, a completion) send no notification: a transaction that notifies takes a
        // database-wide lock through its commit, which would serialise every claim and completion.
        """
        CREATE TABLE workflow_watches (
          tenant_id text NOT NULL,
          run_id uuid NOT NULL,
          watch_id uuid NOT NULL,
          create_time timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (tenant_id, run_id, watch_id)
        )
        """,
        // Runs as the caller (not SECURITY DEFINER), so row-level security applies to the history
        // rows too. The notification (`t <tenant> <state> <previous state or -> <type>`) reaches
        // every replica once the change commits. It is sent when a run became ready (QUEUED, or
        // FAILED and due later), when a run left RUNNING and its type has a concurrency limit
        // (a slot freed), and when someone watches the run; identical payloads in one transaction
        // arrive once.
        """
        CREATE FUNCTION workflow_run_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
          previous text := CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END;
        BEGIN
          INSERT INTO workflow_run_events (tenant_id, run_id, previous_state, state, attempt, last_error)
          VALUES (NEW.tenant_id, NEW.run_id, previous, NEW.state, NEW.attempt, NEW.last_error);
          IF NEW.state IN ('queued', 'failed')
             OR (previous = 'running' AND EXISTS (
                   SELECT 1 FROM tenants
                   WHERE tenant_id = NEW.tenant_id AND quota->'workflowTypeConcurrency' ? NEW.type))
             OR EXISTS (SELECT 1 FROM workflow_watches WHERE tenant_id = NEW.tenant_id AND run_id = NEW.run_id)
          THEN
            PERFORM pg_notify('tollgate_workflow',
              't ' || NEW.tenant_id || ' ' || NEW.state || ' ' || coalesce(previous, '-') || ' ' || NEW.type);
          END IF;
          RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER workflow_run_inserted AFTER INSERT ON workflow_runs
          FOR EACH ROW EXECUTE FUNCTION workflow_run_changed()
        """,
        """
        CREATE TRIGGER workflow_run_updated AFTER UPDATE OF state ON workflow_runs
          FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION workflow_run_changed()
        """,
      ] + tenantOwned("workflow_runs") + tenantOwned("workflow_run_events") + tenantOwned("workflow_watches") + [
        "GRANT SELECT, INSERT, UPDATE ON workflow_runs TO tollgate_tenant, tollgate_platform",
        "GRANT SELECT, INSERT ON workflow_run_events TO tollgate_tenant, tollgate_platform",
        "GRANT SELECT, INSERT, DELETE ON workflow_watches TO tollgate_tenant, tollgate_platform",
      ]
    ),
    Migration(
      version: 5,
      name: "quota leases shared by the replicas of a fleet",
      statements: [
        // One row per (tenant, resource, replica) that replica is using: resource is a quota class
        // (demand = its admission attempts per second) or 'calls' (demand = calls in flight). A
        // replica's share of a rate is its demand over the sum of live demands. Rows of a replica
        // that stops renewing them expire, and their share goes back to the others.
        """
        CREATE TABLE quota_leases (
          tenant_id text NOT NULL REFERENCES tenants (tenant_id),
          resource text NOT NULL,
          replica_id text NOT NULL,
          demand double precision NOT NULL CHECK (demand >= 0),
          expires_at timestamptz NOT NULL,
          PRIMARY KEY (tenant_id, resource, replica_id)
        )
        """,
        "GRANT SELECT, INSERT, UPDATE, DELETE ON quota_leases TO tollgate_platform",
      ]
    ),
    Migration(
      version: 6,
      name: "audit events committed with their mutation, waiting for their log index",
      statements: [
        // A mutating call's transaction writes its event here instead of appending to the log:
        // an append holds the log's head row until commit, which let one tenant commit only one
        // mutation at a time. The sequencer moves these rows into the log in batches, deleting
        // them in the transaction that appends them, so each event is in exactly one place.
        """
        CREATE TABLE audit_pending (
          seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
          tenant_id text NOT NULL,
          leaf bytea NOT NULL,
          event_time timestamptz NOT NULL,
          method text NOT NULL,
          principal text NOT NULL,
          outcome integer NOT NULL
        )
        """,
        "CREATE INDEX audit_pending_by_log ON audit_pending (tenant_id, seq)",
        "ALTER TABLE audit_pending ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE audit_pending FORCE ROW LEVEL SECURITY",
        """
        CREATE POLICY platform_access ON audit_pending TO tollgate_platform
          USING ((SELECT current_user) = 'tollgate_platform')
          WITH CHECK ((SELECT current_user) = 'tollgate_platform')
        """,
        "GRANT SELECT, INSERT, DELETE ON audit_pending TO tollgate_platform",
      ]
    ),
    Migration(
      version: 7,
      name: "an index of the runs scheduled for later",
      statements: [
        // A claim that comes up short asks when the next run of its types becomes due. Through
        // the ready index that read every ready run of those types, so under a backlog each such
        // claim cost in proportion to the backlog. Only a run written with a due time after its
        // write time (a later start, a retry's backoff) can be due in the future, since every
        // write sets update_time to now(); this index holds only those, and runs due at once
        // never enter it.
        """
        CREATE INDEX IF NOT EXISTS workflow_runs_scheduled ON workflow_runs (tenant_id, type, run_after)
          WHERE state IN ('queued', 'failed') AND run_after > update_time
        """,
      ]
    ),
    Migration(
      version: 8,
      name: "audit leaf hashes kept in the leaf row; tree nodes only every eighth level",
      statements: [
        // The leaf hash recorded at append time, beside its leaf: proofs are built from it (and
        // the kept tile roots), not from the leaf bytes as they are now, so a verifier can still
        // locate a leaf altered in place by the gateway's proofs. It replaces the level-0 rows of
        // audit_nodes, which were half of that table: one row per audited call instead of three.
        // Leaves appended before this version keep NULL here; their level-0 node rows stay and
        // are read instead. Adding a column without a default rewrites nothing.
        "ALTER TABLE audit_leaves ADD COLUMN leaf_hash bytea CHECK (length(leaf_hash) = 32)",
      ]
    ),
  ]
}
