// swift-tools-version:6.1
import PackageDescription

// One set of settings for every target: Swift 6 mode and the upcoming features that keep
// imports and existentials explicit (as grpc-swift-2 does).
let swiftSettings: [SwiftSetting] = [
  .swiftLanguageMode(.v6),
  .enableUpcomingFeature("ExistentialAny"),
  .enableUpcomingFeature("InternalImportsByDefault"),
  .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
  name: "tollgate",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "tollgate", targets: ["tollgate"]),
    .executable(name: "tollctl", targets: ["tollctl"]),
  ],
  dependencies: [
    .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
    .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
    .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
    .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
    .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    .package(url: "https://github.com/apple/swift-nio-http2", from: "1.46.0"),
    .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
    .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
    .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
    .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
    .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
  ],
  targets: [
    // Domain values shared by every layer, and the metrics API they record through (swift-metrics);
    // no I/O, no gRPC, no Postgres.
    .target(
      name: "TollgateModel",
      dependencies: [.product(name: "CoreMetrics", package: "swift-metrics")],
      swiftSettings: swiftSettings
    ),
    // Generated from Protos/ by tools/gen-protos (committed).
    .target(
      name: "TollgateProtos",
      dependencies: [
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
      ],
      swiftSettings: swiftSettings
    ),
    // Identity, authorization, configuration, errors and the interceptors. Knows nothing of Postgres.
    .target(
      name: "TollgateCore",
      dependencies: [
        "TollgateModel",
        "TollgateProtos",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "SwiftASN1", package: "swift-asn1"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Tracing", package: "swift-distributed-tracing"),
      ],
      swiftSettings: swiftSettings
    ),
    // Postgres pool, migrations, tenant-scoped transactions, repositories. Knows nothing of gRPC.
    .target(
      name: "TollgateStore",
      dependencies: [
        "TollgateModel", "TollgateMerkle",
        .product(name: "PostgresNIO", package: "postgres-nio"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Tracing", package: "swift-distributed-tracing"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
    // What every service handler shares: mapping store failures to client-facing statuses.
    .target(
      name: "TollgateServiceSupport",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: swiftSettings
    ),
    // TenantService: tenant administration, quotas, suspension, certificate revocation.
    .target(
      name: "TollgateTenancy",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore", "TollgateProtos", "TollgateServiceSupport",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: swiftSettings
    ),
    // MeteringService: usage ingestion, meters and usage queries.
    .target(
      name: "TollgateMetering",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore", "TollgateProtos", "TollgateServiceSupport",
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
      ],
      swiftSettings: swiftSettings
    ),
    // WorkflowService: durable runs, approvals, and leases handed to workers over one stream.
    .target(
      name: "TollgateWorkflow",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore", "TollgateProtos", "TollgateServiceSupport", "TollgateAudit",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
    // The audit trail: the audit interceptor, its buffer, checkpoint signing and AuditService.
    .target(
      name: "TollgateAudit",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore", "TollgateProtos", "TollgateMerkle", "TollgateServiceSupport",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
    // RFC 6962 Merkle trees and C2SP signed checkpoints: shared by the audit log and its verifiers.
    .target(
      name: "TollgateMerkle",
      dependencies: [.product(name: "Crypto", package: "swift-crypto")],
      swiftSettings: swiftSettings
    ),
    // Certificate authority and issuance (tollctl certs, tests, tools/dev).
    .target(
      name: "TollgateCertificates",
      dependencies: [
        "TollgateModel",
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "Crypto", package: "swift-crypto"),
        .product(name: "SwiftASN1", package: "swift-asn1"),
      ],
      swiftSettings: swiftSettings
    ),
    // Client-side connection helper shared by tollctl and the end-to-end tests.
    .target(
      name: "TollgateClient",
      dependencies: [
        "TollgateMerkle", "TollgateProtos",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
      ],
      swiftSettings: swiftSettings
    ),
    // Assembly: the gRPC server with its interceptors in order, health, reflection, lifecycle.
    .target(
      name: "TollgateGateway",
      dependencies: [
        "TollgateModel", "TollgateCore", "TollgateStore", "TollgateProtos", "TollgateTenancy", "TollgateAudit",
        "TollgateMetering", "TollgateWorkflow",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOSSL", package: "swift-nio-ssl"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "Prometheus", package: "swift-prometheus"),
        .product(name: "NIOCertificateReloading", package: "swift-nio-extras"),
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "SwiftASN1", package: "swift-asn1"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Tracing", package: "swift-distributed-tracing"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        .product(name: "UnixSignals", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
    .executableTarget(
      name: "tollgate",
      dependencies: [
        "TollgateGateway", "TollgateCore", "TollgateStore", "TollgateModel",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Tracing", package: "swift-distributed-tracing"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
    // Benchmarks (tools/bench): in-process gateway, client and baselines.
    .executableTarget(
      name: "tollgate-bench",
      dependencies: [
        "TollgateGateway", "TollgateAudit", "TollgateStore", "TollgateClient", "TollgateCertificates", "TollgateCore",
        "TollgateMerkle", "TollgateModel", "TollgateProtos",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "PostgresNIO", package: "postgres-nio"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
      ],
      swiftSettings: swiftSettings
    ),
    .executableTarget(
      name: "tollctl",
      dependencies: [
        "TollgateMerkle",
        "TollgateModel", "TollgateProtos", "TollgateCertificates", "TollgateClient",
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      swiftSettings: swiftSettings
    ),
    .testTarget(
      name: "TollgateCoreTests",
      dependencies: [
        "TollgateCore", "TollgateModel", "TollgateProtos", "TollgateCertificates",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "X509", package: "swift-certificates"),
      ],
      swiftSettings: swiftSettings
    ),
    .testTarget(
      name: "TollgateMerkleTests",
      dependencies: ["TollgateMerkle", .product(name: "Crypto", package: "swift-crypto")],
      swiftSettings: swiftSettings
    ),
    .testTarget(
      name: "TollgateEndToEndTests",
      dependencies: [
        "TollgateGateway", "TollgateCore", "TollgateStore", "TollgateModel", "TollgateProtos",
        "TollgateCertificates", "TollgateClient", "TollgateAudit", "TollgateMerkle",
        .product(name: "Tracing", package: "swift-distributed-tracing"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "PostgresNIO", package: "postgres-nio"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: swiftSettings
    ),
  ]
)
