public import Logging
import PostgresNIO
public import TollgateModel

/// The fleet's shared view of quota use (migration 5): each replica renews its leases, one per
/// (tenant, resource) it is using, with its current demand, and reads the others' live demands.
public struct QuotaLeaseRepository: Sendable {
  let database: Database

  public init(database: Database) {
    self.database = database
  }

  /// The `resource` of a concurrency lease; other resources are quota class names.
  public static let callsResource = "calls"

  /// One of this replica's leases: what it is using and how much.
  public struct Lease: Sendable, Hashable {
    public var key: ResourceKey
    public var demand: Double

    public init(key: ResourceKey, demand: Double) {
      self.key = key
      self.demand = demand
    }
  }

  public struct ResourceKey: Sendable, Hashable {
    public var tenant: TenantID
    public var resource: String

    public init(tenant: TenantID, resource: String) {
      self.tenant = tenant
      self.resource = resource
    }
  }

  /// What the other live replicas hold, per (tenant, resource) any of them leases.
  public struct Held: Sendable, Equatable {
    /// Sum of their demands.
    public var demand: Double
    /// How many of them lease it.
    public var replicas: Int

    public init(demand: Double, replicas: Int) {
      self.demand = demand
      self.replicas = replicas
    }
  }

  /// In one transaction: renews `leases` for `ttlMilliseconds`, drops this replica's leases not
  /// in `leases` and long-dead rows, and reads what the other live replicas hold.
  public func renew(
    replica: String,
    leases: [Lease],
    ttlMilliseconds: Int,
    logger: Logger
  ) async throws(StoreError) -> [ResourceKey: Held] {
    let tenants = leases.map(\.key.tenant.rawValue)
    let resources = leases.map(\.key.resource)
    let demands = leases.map(\.demand)
    return try await database.withPlatform(logger: logger) { connection in
      try await connection.prepared(
        """
        WITH mine AS (
          SELECT * FROM unnest(\(tenants)::text[], \(resources)::text[], \(demands)::float8[])
            AS m(tenant_id, resource, demand)
        ), renewed AS (
          INSERT INTO quota_leases (tenant_id, resource, replica_id, demand, expires_at)
          SELECT tenant_id, resource, \(replica), demand, now() + \(ttlMilliseconds) * interval '1 millisecond'
          FROM mine
          ON CONFLICT (tenant_id, resource, replica_id)
            DO UPDATE SET demand = excluded.demand, expires_at = excluded.expires_at
        )
        DELETE FROM quota_leases l
        WHERE (l.replica_id = \(replica)
               AND NOT EXISTS (SELECT 1 FROM mine m WHERE m.tenant_id = l.tenant_id AND m.resource = l.resource))
           OR l.expires_at < now() - interval '1 minute'
        """,
        logger: logger
      )
      var others: [ResourceKey: Held] = [:]
      let rows = try await connection.prepared(
        """
        SELECT tenant_id, resource, sum(demand)::float8, count(*)::integer
        FROM quota_leases
        WHERE replica_id <> \(replica) AND expires_at > now()
        GROUP BY tenant_id, resource
        """,
        logger: logger
      )
      for try await (tenant, resource, demand, replicas) in rows.decode((String, String, Double, Int).self) {
        others[ResourceKey(tenant: try TenantID(validating: tenant), resource: resource)] =
          Held(demand: demand, replicas: replicas)
      }
      return others
    }
  }

  /// Gives this replica's leases back at once (a clean shutdown) rather than when they expire.
  public func release(replica: String, logger: Logger) async throws(StoreError) {
    try await database.withPlatform(logger: logger) { connection in
      _ = try await connection.query("DELETE FROM quota_leases WHERE replica_id = \(replica)", logger: logger)
    }
  }
}
