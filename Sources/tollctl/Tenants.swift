import ArgumentParser
import GRPCCore
import SwiftProtobuf
import TollgateProtos

struct Tenants: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Administer tenants, quotas and certificate revocations.",
    subcommands: [Create.self, Get.self, List.self, Suspend.self, Resume.self, Quota.self, Revoke.self, Revocations.self]
  )

  struct Create: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a tenant (operator).")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Tenant id: 3-63 lowercase letters, digits and '-'") var id: String
    @Option(help: "Display name") var displayName: String = ""

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.createTenant(.with {
          $0.tenantID = id
          $0.displayName = displayName
        }, metadata: metadata)
      }
      try printJSON(response.tenant)
    }
  }

  struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a tenant (default: your own).")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Tenant id; omit for your own tenant") var id: String = ""

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.getTenant(.with { $0.tenantID = id }, metadata: metadata)
      }
      try printJSON(response.tenant)
    }
  }

  struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List tenants, following every page (operator).")
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Page size for each request") var pageSize: Int32 = 100

    func run() async throws {
      let tenants = try await connection.withTenantService { service, metadata in
        var all: [Tollgate_V1_Tenant] = []
        var token = ""
        repeat {
          let page = try await service.listTenants(.with {
            $0.pageSize = pageSize
            $0.pageToken = token
          }, metadata: metadata)
          all += page.tenants
          token = page.nextPageToken
        } while !token.isEmpty
        return all
      }
      try printJSON(Tollgate_V1_ListTenantsResponse.with { $0.tenants = tenants })
    }
  }

  struct Suspend: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Suspend a tenant (operator).")
    @OptionGroup var connection: ConnectionOptions
    @Argument var id: String
    @Option(help: "Why") var reason: String = ""

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.suspendTenant(.with {
          $0.tenantID = id
          $0.reason = reason
        }, metadata: metadata)
      }
      try printJSON(response.tenant)
    }
  }

  struct Resume: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Resume a suspended tenant (operator).")
    @OptionGroup var connection: ConnectionOptions
    @Argument var id: String

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.resumeTenant(.with { $0.tenantID = id }, metadata: metadata)
      }
      try printJSON(response.tenant)
    }
  }

  struct Quota: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Replace a tenant's quota (operator). Classes not given get the defaults."
    )
    @OptionGroup var connection: ConnectionOptions
    @Argument var id: String
    @Option(name: .customLong("limit"), help: "CLASS=RATE/BURST, e.g. ingest=500/1000 (repeatable)")
    var limits: [String] = []
    @Option(help: "Maximum concurrent calls (0 = default)") var maxConcurrentCalls: UInt32 = 0
    @Option(help: "Usage events per month (0 = unlimited)") var monthlyUsageEvents: UInt64 = 0
    @Option(name: .customLong("type-concurrency"), help: "TYPE=N: at most N runs of workflow task type TYPE running at once (repeatable)")
    var typeConcurrency: [String] = []

    static let classes: [String: Tollgate_V1_QuotaClass] = [
      "ingest": .ingest, "query": .query, "admin": .admin, "workflow": .workflow, "audit": .audit,
    ]

    func run() async throws {
      var quota = Tollgate_V1_Quota()
      for text in limits {
        let parts = text.split(separator: "=", maxSplits: 1)
        let numbers = parts.count == 2 ? parts[1].split(separator: "/") : []
        guard parts.count == 2, numbers.count == 2, let rate = Double(numbers[0]), let burst = UInt32(numbers[1]),
          let cls = Self.classes[String(parts[0]).lowercased()]
        else {
          throw ValidationError("--limit '\(text)': expected CLASS=RATE/BURST with CLASS one of ingest, query, admin, workflow, audit")
        }
        quota.rateLimits.append(.with {
          $0.quotaClass = cls
          $0.ratePerSecond = rate
          $0.burst = burst
        })
      }
      quota.maxConcurrentCalls = maxConcurrentCalls
      quota.monthlyUsageEvents = monthlyUsageEvents
      for text in typeConcurrency {
        let parts = text.split(separator: "=", maxSplits: 1)
        guard parts.count == 2, let limit = UInt32(parts[1]) else {
          throw ValidationError("--type-concurrency '\(text)': expected TYPE=N, e.g. invoice-export=2")
        }
        quota.workflowTypeConcurrency[String(parts[0])] = limit
      }
      let response = try await connection.withTenantService { service, metadata in
        try await service.updateQuota(.with {
          $0.tenantID = id
          $0.quota = quota
        }, metadata: metadata)
      }
      try printJSON(response.tenant)
    }
  }

  struct Revoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Revoke a client certificate by serial or SHA-256 fingerprint.")
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Serial number in hex") var serial: String = ""
    @Option(help: "SHA-256 fingerprint of the DER certificate, hex") var fingerprint: String = ""
    @Option(help: "Why (required)") var reason: String

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.revokeCertificate(.with {
          $0.serialHex = serial
          $0.sha256Fingerprint = fingerprint
          $0.reason = reason
        }, metadata: metadata)
      }
      try printJSON(response.revocation)
    }
  }

  struct Revocations: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List revocations, newest first.")
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Page size") var pageSize: Int32 = 100
    @Option(help: "Page token from a previous listing") var pageToken: String = ""

    func run() async throws {
      let response = try await connection.withTenantService { service, metadata in
        try await service.listRevocations(.with {
          $0.pageSize = pageSize
          $0.pageToken = pageToken
        }, metadata: metadata)
      }
      try printJSON(response)
    }
  }
}
