import Crypto
import PostgresNIO
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import ServiceLifecycle
import Synchronization
import SwiftProtobuf
import Testing
@testable import TollgateAudit
import TollgateCertificates
@testable import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateMerkle
import TollgateModel
import TollgateProtos
@testable import TollgateStore

/// The audit trail end to end: what is recorded, when it is committed, and that a verifier holding
/// only the public key detects every kind of tampering done directly in Postgres.
@Suite(.timeLimit(.minutes(3))) struct AuditTests {
  static let createTenant = "/tollgate.v1.TenantService/CreateTenant"
  static let updateQuota = "/tollgate.v1.TenantService/UpdateQuota"
  static let listTenants = "/tollgate.v1.TenantService/ListTenants"

  /// Everything a StreamEvents call returns without following.
  static func records(
    _ gw: TestGateway,
    as issued: CertificateAuthority.Issued,
    metadata: Metadata = [:],
    _ configure: (inout Tollgate_V1_StreamEventsRequest) -> Void = { _ in }
  ) async throws -> [Tollgate_V1_AuditRecord] {
    var request = Tollgate_V1_StreamEventsRequest()
    configure(&request)
    let out = Mutex<[Tollgate_V1_AuditRecord]>([])
    try await gw.withClient(issued) { client async throws in
      try await AuditReader(client: client, metadata: metadata).records(request) { record in
        out.withLock { $0.append(record) }
        return true
      }
    }
    return out.withLock { $0 }
  }

  static func createTenant(_ gw: TestGateway, _ id: String) async throws {
    try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
      _ = try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(.with { $0.tenantID = id })
    }
  }

  /// `count` UpdateQuota calls by an operator acting on `tenant`: mutations, so each is in the
  /// tenant's log when its reply arrives.
  /// `deadline` replaces the test client's default for each call, for callers that queue many.
  static func mutate(
    _ gw: TestGateway,
    _ tenant: String,
    count: Int,
    concurrently: Bool = false,
    deadline: Duration? = nil
  ) async throws {
    var options = CallOptions.defaults
    if let deadline { options.timeout = deadline }
    try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
      let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
      try await withThrowingTaskGroup(of: Void.self) { group in
        for i in 0..<count {
          let call: @Sendable () async throws -> Void = { [options] in
            _ = try await tenants.updateQuota(
              .with { $0.quota.monthlyUsageEvents = UInt64(1000 + i) },
              metadata: actingOn(tenant),
              options: options
            )
          }
          if concurrently { group.addTask(operation: call) } else { try await call() }
        }
        try await group.waitForAll()
      }
    }
  }

  /// A verifier holding only the test gateway's published audit key.
  static func verifier(_ gw: TestGateway) -> AuditLogVerifier {
    AuditLogVerifier(key: AuditVerifierKey(name: gw.pki.auditKey.name, publicKey: gw.pki.auditKey.publicKey))
  }

  /// Adds `delta` (mod 256) to one byte of record `index`'s stored leaf, inside the request digest
  /// (field 9: tag 0x4a, length 0x20), so the event still decodes. A fixed offset from the end is
  /// not enough: the fields after the digest, and the latency's varint before it, vary in length
  /// from call to call.
  static func addToDigestByte(_ gw: TestGateway, tenant: String, index: Int, _ delta: Int) async throws {
    let digestByte = "position('\\x4a20'::bytea IN leaf) + 10"
    try await gw.adminSQL(
      """
      UPDATE audit_leaves SET leaf = set_byte(leaf, \(digestByte), (get_byte(leaf, \(digestByte)) + \(delta)) % 256)
      WHERE tenant_id = '\(tenant)' AND leaf_index = \(index)
      """
    )
  }

  /// Streams the whole log, fetches a checkpoint and verifies, pinpointing with the gateway's proofs.
  static func verify(_ gw: TestGateway, tenant: String) async throws(AuditVerificationFailure) -> Checkpoint {
    let op: CertificateAuthority.Issued
    let records: [Tollgate_V1_AuditRecord]
    let note: String
    do {
      // Checkpoint first: reading is audited too, so the log grows while it is read, and the
      // verifier ignores records past the checkpoint.
      op = try gw.pki.issueOperator()
      note = try await gw.withClient(op) { client async throws in
        try await AuditReader(client: client, metadata: actingOn(tenant)).checkpoint().signedNote
      }
      records = try await Self.records(gw, as: op, metadata: actingOn(tenant))
    } catch {
      Issue.record("reading the log failed: \(error)")
      throw .proof("\(error)")
    }
    let verifier = Self.verifier(gw)
    return try await verifier.verifyLog(
      records: records.map { ($0.index, Array($0.leaf)) },
      checkpointNote: note
    ) { old, new in
      try await gw.withClient(op) { client async throws in
        try await AuditReader(client: client, metadata: actingOn(tenant)).consistencyProof(old: old, new: new)
      }
    }
  }

  @Test func mutatingCallIsInTheLogWhenItsReplyArrives() async throws {
    try await TestGateway.run { gw in
      let request = Tollgate_V1_CreateTenantRequest.with {
        $0.tenantID = "acme"
        $0.displayName = "Acme"
      }
      let op = try gw.pki.issueOperator("alice")
      _ = try await gw.withClient(op) { client async throws in
        try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(request)
      }
      // No waiting: the event committed with the tenant row, as the first record of its log.
      let log = try await Self.records(gw, as: op, metadata: actingOn("acme"))
      let created = try #require(log.first { $0.event.method == Self.createTenant })
      #expect(created.index == 0)
      #expect(created.event.outcomeCode == 0)
      #expect(created.event.resource == "tenants/acme")
      #expect(created.event.tenantID == "acme")
      #expect(created.event.impersonated == false)
      #expect(created.event.principal.spiffeID == "spiffe://example.org/operator/alice")
      #expect(created.event.principal.role == .operator)
      #expect(created.event.principal.certificateSha256.count == 64)
      var options = BinaryEncodingOptions()
      options.useDeterministicOrdering = true
      let requestBytes: [UInt8] = try request.serializedBytes(options: options)
      #expect(created.event.requestSha256 == Data(SHA256.hash(data: requestBytes)))
      // The decoded event is exactly the stored leaf.
      #expect(try Tollgate_V1_AuditEvent(serializedBytes: created.leaf) == created.event)
      #expect(log.map(\.index) == Array(0..<UInt64(log.count)))

      // A failed mutation is recorded with its status, also before its reply.
      let again = await statusCode {
        try await gw.withClient(op) { client async throws in
          try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(request)
        }
      }
      #expect(again == .alreadyExists)
      let after = try await Self.records(gw, as: op, metadata: actingOn("acme")) { $0.methods = [Self.createTenant] }
      #expect(after.map(\.event.outcomeCode) == [0, Int32(RPCError.Code.alreadyExists.rawValue)])

      // An operator acting on a tenant is recorded in that tenant's log, marked impersonated.
      try await Self.mutate(gw, "acme", count: 1)
      let acme = try await Self.records(gw, as: op, metadata: actingOn("acme")) { $0.methods = [Self.updateQuota] }
      #expect(acme.count == 1)
      #expect(acme.first?.event.impersonated == true)
      #expect(acme.first?.event.tenantID == "acme")
    }
  }

  @Test func operatorAdministrationOfATenantIsInThatTenantsLog() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      let op = try gw.pki.issueOperator("olga")
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        _ = try await tenants.suspendTenant(.with { $0.tenantID = "acme" })
        _ = try await tenants.resumeTenant(.with { $0.tenantID = "acme" })
        _ = try await tenants.getTenant(.with { $0.tenantID = "acme" })
        _ = try await tenants.listTenants(.init())
      }
      let missing = await statusCode {
        try await gw.withClient(op) { client async throws in
          try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.with { $0.tenantID = "nobody" })
        }
      }
      #expect(missing == .notFound)
      let again = await statusCode {
        try await gw.withClient(op) { client async throws in
          try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(.with { $0.tenantID = "acme" })
        }
      }
      #expect(again == .alreadyExists)
      await gw.gateway.auditBuffer.allCommitted()

      // What was done to acme, refusals included, is in acme's log, where its auditors read it.
      let acme = try await Self.records(gw, as: op, metadata: actingOn("acme"))
      // Reading the log is audited too; leave those reads out.
      let administration = { (record: Tollgate_V1_AuditRecord) in !record.event.method.hasPrefix("/tollgate.v1.AuditService/") }
      let acted = acme.filter { $0.event.principal.spiffeID == "spiffe://example.org/operator/olga" && administration($0) }
      // Read-only events commit with the next flush, after mutations made meanwhile: compare
      // without order.
      let done = acted.map { "\($0.event.method) \($0.event.outcomeCode)" }.sorted()
      #expect(done == [
        "\(Self.createTenant) \(RPCError.Code.alreadyExists.rawValue)", "/tollgate.v1.TenantService/GetTenant 0",
        "/tollgate.v1.TenantService/ResumeTenant 0", "/tollgate.v1.TenantService/SuspendTenant 0",
      ])
      #expect(acted.allSatisfy { $0.event.tenantID == "acme" && $0.event.resource == "tenants/acme" && !$0.event.impersonated })
      // Read by acme's own auditor, as its compliance team would.
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor)
      let seen = try await Self.records(gw, as: auditor) { $0.principalSpiffeID = "spiffe://example.org/operator/olga" }
      #expect(seen.filter(administration).map(\.index) == acted.map(\.index))

      // Calls on no tenant, or on one that does not exist, stay in the platform log, and no log is
      // made for a tenant id nobody registered.
      let platform = try await Self.records(gw, as: op) { $0.principalSpiffeID = "spiffe://example.org/operator/olga" }
      #expect(platform.filter(administration).map(\.event.method) == [Self.listTenants, "/tollgate.v1.TenantService/GetTenant"])
      #expect(platform.filter(administration).last?.event.resource == "tenants/nobody")
      #expect(try await gw.count("SELECT count(*) FROM audit_logs WHERE tenant_id = 'nobody'") == 0)
    }
  }

  @Test func deniedReadIsRecordedAndFollowersSeeItWithoutPolling() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor, name: "compliance")
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      let (followerReady, ready) = AsyncStream.makeStream(of: Void.self)
      let found = try await withThrowingTaskGroup(of: Tollgate_V1_AuditEvent?.self) { group in
        group.addTask {
          // Follows the log and ends once the denied call appears; the suite's time limit bounds it.
          let seen = Mutex<Tollgate_V1_AuditEvent?>(nil)
          try await gw.withClient(auditor) { client async throws in
            let request = Tollgate_V1_StreamEventsRequest.with {
              $0.follow = true
              $0.methods = [Self.listTenants]
            }
            ready.yield()
            try await AuditReader(client: client).records(request) { record in
              seen.withLock { $0 = record.event }
              return false
            }
          }
          return seen.withLock { $0 }
        }
        var iterator = followerReady.makeAsyncIterator()
        await iterator.next()
        let denied = await statusCode {
          try await gw.withClient(partner) { client async throws in
            try await Tollgate_V1_TenantService.Client(wrapping: client).listTenants(.init())
          }
        }
        #expect(denied == .permissionDenied)
        return try await group.next() ?? nil
      }
      let event = try #require(found)
      #expect(event.outcomeCode == Int32(RPCError.Code.permissionDenied.rawValue))
      #expect(event.outcomeMessage.contains("may not call"))
      #expect(event.principal.role == .partner)
      #expect(event.tenantID == "acme")

      // An auditor reads only its own tenant's log; a partner may not read audit at all.
      let foreign = await statusCode {
        try await gw.withClient(auditor) { client async throws in
          try await AuditReader(client: client, metadata: actingOn("other")).checkpoint()
        }
      }
      #expect(foreign == .permissionDenied)
      let byPartner = await statusCode {
        try await gw.withClient(partner) { client async throws in try await AuditReader(client: client).checkpoint() }
      }
      #expect(byPartner == .permissionDenied)
    }
  }

  @Test func verifierDetectsAlteredDeletedAndSwappedRecords() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 12)
      let checkpoint = try await Self.verify(gw, tenant: "acme")
      #expect(checkpoint.treeSize >= 12)
      #expect(checkpoint.origin == "tollgate/example.org/acme")

      // One byte of a stored leaf.
      try await Self.addToDigestByte(gw, tenant: "acme", index: 5, 1)
      await #expect(throws: AuditVerificationFailure.altered(index: 5)) { try await Self.verify(gw, tenant: "acme") }
      try await Self.addToDigestByte(gw, tenant: "acme", index: 5, 255)
      _ = try await Self.verify(gw, tenant: "acme")

      // A deleted row.
      try await gw.adminSQL(
        "CREATE TABLE saved AS SELECT * FROM audit_leaves WHERE tenant_id = 'acme' AND leaf_index = 7",
        "DELETE FROM audit_leaves WHERE tenant_id = 'acme' AND leaf_index = 7"
      )
      await #expect(throws: AuditVerificationFailure.missing(index: 7)) { try await Self.verify(gw, tenant: "acme") }
      try await gw.adminSQL("INSERT INTO audit_leaves SELECT * FROM saved", "DROP TABLE saved")
      _ = try await Self.verify(gw, tenant: "acme")

      // Two rows swapped.
      try await gw.adminSQL(
        """
        UPDATE audit_leaves a SET leaf = b.leaf FROM audit_leaves b
        WHERE a.tenant_id = 'acme' AND b.tenant_id = 'acme'
          AND ((a.leaf_index = 3 AND b.leaf_index = 9) OR (a.leaf_index = 9 AND b.leaf_index = 3))
        """
      )
      await #expect(throws: AuditVerificationFailure.altered(index: 3)) { try await Self.verify(gw, tenant: "acme") }
    }
  }

  /// Verifies the records from `start` on as `tollctl audit verify --start` does: one inclusion
  /// proof for the edge, consistency proofs only to locate a fault. `edge` may alter that proof.
  static func verifyRange(
    _ gw: TestGateway,
    tenant: String,
    from start: UInt64,
    edge: @escaping @Sendable ([MerkleTree.Hash]) throws -> [MerkleTree.Hash] = { $0 }
  ) async throws -> Checkpoint {
    let op = try gw.pki.issueOperator()
    let verifier = Self.verifier(gw)
    return try await gw.withClient(op) { client async throws in
      let reader = AuditReader(client: client, metadata: actingOn(tenant))
      let note = try await reader.checkpoint().signedNote
      let records = try await Self.records(gw, as: op, metadata: actingOn(tenant)) { $0.startIndex = start }
      return try await verifier.verifyRange(
        from: start,
        records: records.map { ($0.index, Array($0.leaf)) },
        checkpointNote: note,
        edgeProof: { index, size in try edge(try await reader.inclusionProof(index: index, treeSize: size)) }
      ) { old, new in
        try await reader.consistencyProof(old: old, new: new)
      }
    }
  }

  @Test func rangeVerifiesFromOneInclusionProofAndNamesTheFirstBadIndex() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 20)
      let whole = try await Self.verify(gw, tenant: "acme")
      for start: UInt64 in [1, 6, 8, 13] {
        let checkpoint = try await Self.verifyRange(gw, tenant: "acme", from: start)
        #expect(checkpoint.treeSize >= whole.treeSize)
      }
      // Past the end: the log is shorter than the caller's start, which is not "0 records verified".
      do {
        _ = try await Self.verifyRange(gw, tenant: "acme", from: 1_000_000)
        Issue.record("a range past the end of the log verified")
      } catch AuditVerificationFailure.beyondEnd(let start, let size) {
        #expect(start == 1_000_000 && size >= whole.treeSize)
      }

      // A record inside the range is named; one before it is not the range's concern.
      try await Self.addToDigestByte(gw, tenant: "acme", index: 11, 1)
      await #expect(throws: AuditVerificationFailure.altered(index: 11)) { _ = try await Self.verifyRange(gw, tenant: "acme", from: 6) }
      await #expect(throws: AuditVerificationFailure.altered(index: 11)) { _ = try await Self.verifyRange(gw, tenant: "acme", from: 11) }
      _ = try await Self.verifyRange(gw, tenant: "acme", from: 12)
      try await Self.addToDigestByte(gw, tenant: "acme", index: 11, 255)
      _ = try await Self.verifyRange(gw, tenant: "acme", from: 6)

      // An edge that does not hash the records before the range is the gateway's fault, not theirs.
      do {
        _ = try await Self.verifyRange(gw, tenant: "acme", from: 13) { proof in
          var proof = proof
          proof[0][0] ^= 1
          return proof
        }
        Issue.record("a range verified on a wrong edge")
      } catch AuditVerificationFailure.proof(_) {}
      // A proof that could not be fetched is no finding either way.
      do {
        _ = try await Self.verifyRange(gw, tenant: "acme", from: 13) { _ in throw RPCError(code: .unavailable, message: "down") }
        Issue.record("a range verified without its edge")
      } catch AuditVerificationFailure.unanswered(_) {}

      // A row deleted from the range leaves a gap.
      try await gw.adminSQL("DELETE FROM audit_leaves WHERE tenant_id = 'acme' AND leaf_index = 9")
      await #expect(throws: AuditVerificationFailure.missing(index: 9)) { _ = try await Self.verifyRange(gw, tenant: "acme", from: 6) }
      // A proof that needs the deleted record's hash cannot be made: DATA_LOSS, not an internal error.
      let lost = await statusCode {
        try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
          _ = try await AuditReader(client: client, metadata: actingOn("acme")).inclusionProof(index: 6, treeSize: 20)
        }
      }
      #expect(lost == .dataLoss)
      // A range after the gap needs the deleted record's hash for its edge: the gateway's DATA_LOSS
      // is reported as damage found, not as a check that could not be made.
      do {
        _ = try await Self.verifyRange(gw, tenant: "acme", from: 10)
        Issue.record("a range verified on an edge the gateway could not make")
      } catch AuditVerificationFailure.proof(let why) {
        #expect(why.contains("damaged"))
      }
    }
  }

  @Test func proofsVerifyAgainstSignedCheckpoints() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      let op = try gw.pki.issueOperator()
      let verifier = Self.verifier(gw)
      try await Self.mutate(gw, "acme", count: 5)
      try await gw.withClient(op) { client async throws in
        let reader = AuditReader(client: client, metadata: actingOn("acme"))
        // Every read here is itself audited in acme's log, so sizes only grow by at least the
        // mutations made.
        let first = try verifier.checkpoint(note: try await reader.checkpoint().signedNote)
        #expect(first.treeSize >= 5)
        try await Self.mutate(gw, "acme", count: 6)
        let second = try verifier.checkpoint(note: try await reader.checkpoint().signedNote)
        #expect(second.treeSize >= first.treeSize + 6)
        try verifier.verifyConsistency(
          old: first,
          new: second,
          proof: try await reader.consistencyProof(old: first.treeSize, new: second.treeSize)
        )
        for index in UInt64(0)..<second.treeSize {
          let proof = try await reader.client.getInclusionProof(.with {
            $0.index = index
            $0.treeSize = second.treeSize
          }, metadata: actingOn("acme"))
          try verifier.verifyInclusion(index: index, leaf: Array(proof.leaf), proof: proof.hashes.map { Array($0) }, checkpoint: second)
        }
        let beyond = await statusCode {
          try await reader.client.getInclusionProof(.with {
            $0.index = 3
            $0.treeSize = 500
          }, metadata: actingOn("acme"))
        }
        #expect(beyond == .invalidArgument)

        // A client resuming from its verified checkpoint gets a newer one and the proof first.
        try await Self.mutate(gw, "acme", count: 2)
        let head = Mutex<[Tollgate_V1_StreamEventsResponse]>([])
        try await reader.stream(.with {
          $0.startIndex = second.treeSize
          $0.verifiedTreeSize = second.treeSize
        }) { message in
          head.withLock { $0.append(message) }
          return true
        }
        let messages = head.withLock { $0 }
        guard case .checkpoint(let newer) = messages.first?.item, case .consistencyProof(let proof) = messages.dropFirst().first?.item
        else {
          Issue.record("stream did not start with a checkpoint and its proof: \(messages.prefix(2))")
          return
        }
        let third = try verifier.checkpoint(note: newer.signedNote)
        #expect(third.treeSize >= second.treeSize + 2)
        try verifier.verifyConsistency(old: second, new: third, proof: proof.hashes.map { Array($0) })
        let indices: [UInt64] = messages.dropFirst(2).flatMap {
          if case .records(let batch) = $0.item { return batch.records.map(\.index) }
          return []
        }
        #expect(indices.first == second.treeSize)
        #expect(indices == Array(second.treeSize..<(second.treeSize + UInt64(indices.count))))
        #expect(indices.count >= 2)
      }
    }
  }

  /// A check that resumes from a checkpoint verified earlier must catch a log cut back, or
  /// rewritten and signed again with the gateway's own key, which re-hashing records cannot.
  @Test func resumedCheckCatchesALogCutBackOrRewrittenAndSignedAgain() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 8)
      let op = try gw.pki.issueOperator()
      let verifier = Self.verifier(gw)
      try await gw.withClient(op) { client async throws in
        let reader = AuditReader(client: client, metadata: actingOn("acme"))
        let proof: (UInt64, UInt64) async throws -> [MerkleTree.Hash] = { try await reader.consistencyProof(old: $0, new: $1) }
        let earlier = try verifier.checkpoint(note: try await reader.checkpoint().signedNote)
        try await Self.mutate(gw, "acme", count: 4)
        let now = try verifier.checkpoint(note: try await reader.checkpoint().signedNote)
        #expect(now.treeSize >= earlier.treeSize + 4)
        try await verifier.verifyExtends(earlier, to: now, consistencyProof: proof)
        try await verifier.verifyExtends(now, to: now, consistencyProof: proof)

        // Cut back: a log now shorter than it was verified at.
        await #expect(throws: AuditVerificationFailure.self) { try await verifier.verifyExtends(now, to: earlier, consistencyProof: proof) }
        // Rewritten: the same records signed again under another root. As a checkpoint on its own
        // it verifies; only the root remembered from before shows it.
        var rewritten = earlier
        rewritten.rootHash[0] ^= 1
        let forged = try verifier.checkpoint(note: try gw.pki.auditKey.sign(rewritten))
        for (old, new) in [(earlier, forged), (forged, now)] {
          do {
            try await verifier.verifyExtends(old, to: new, consistencyProof: proof)
            Issue.record("a rewritten log extended \(old.treeSize) -> \(new.treeSize)")
          } catch AuditVerificationFailure.forked(_) {}
        }
        // A proof that could not be fetched is no finding either way.
        do {
          try await verifier.verifyExtends(earlier, to: now) { _, _ in throw RPCError(code: .unavailable, message: "down") }
          Issue.record("extension verified without its proof")
        } catch AuditVerificationFailure.unanswered(_) {}
        // Another log's checkpoint says nothing about this one.
        let other = try verifier.checkpoint(note: try gw.pki.auditKey.sign(Checkpoint(origin: earlier.origin + "-other", treeSize: 1, rootHash: earlier.rootHash)))
        do {
          try await verifier.verifyExtends(other, to: now, consistencyProof: proof)
          Issue.record("another log's checkpoint was extended")
        } catch AuditVerificationFailure.checkpoint(_) {}

        // The same from records at hand (an export): the first records must hash to the earlier root.
        let records = try await Self.records(gw, as: op, metadata: actingOn("acme")).filter { $0.index < now.treeSize }.map { ($0.index, Array($0.leaf)) }
        try verifier.verifyExtends(earlier, to: now, records: records)
        for (old, new) in [(forged, now), (now, earlier)] {
          do {
            try verifier.verifyExtends(old, to: new, records: records)
            Issue.record("records at hand extended \(old.treeSize) -> \(new.treeSize)")
          } catch AuditVerificationFailure.forked(_) {}
        }
      }
    }
  }

  /// Past 256 leaves a proof combines kept tile roots (level 8) with hashes computed from leaves;
  /// every proof must still equal the one computed from all leaves, and no other level is stored.
  @Test func proofsAcrossTilesMatchProofsFromAllLeaves() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "tiles")
      let tenant = try TenantID(validating: "tiles")
      let repository = AuditLogRepository(database: gw.gateway.database)
      // Batches of uneven sizes, so tile boundaries fall inside batches and between them.
      var appended = 0
      for size in [1, 37, 218, 300, 5, 139] {
        let batch = (0..<size).map { i in
          AuditEventBuilder.entry(
            scope: nil, tenant: tenant, method: "/test/Append", resource: "leaves/\(appended + i)", code: 0, message: ""
          )
        }
        try await repository.append(batch, logger: testLogger)
        appended += size
      }
      #expect(appended == 700)
      let unkept = try await TestDatabase.adminCount(
        gw.database.admin, "SELECT count(*) FROM audit_nodes WHERE tenant_id = 'tiles' AND level % 8 <> 0", database: gw.database.name)
      #expect(unkept == 0)

      let op = try gw.pki.issueOperator()
      let verifier = Self.verifier(gw)
      try await gw.withClient(op) { client async throws in
        let reader = AuditReader(client: client, metadata: actingOn("tiles"))
        let checkpoint = try verifier.checkpoint(note: try await reader.checkpoint().signedNote)
        #expect(checkpoint.treeSize >= 700)
        let kept = try await TestDatabase.adminCount(
          gw.database.admin, "SELECT count(*) FROM audit_nodes WHERE tenant_id = 'tiles' AND level = 8", database: gw.database.name)
        #expect(kept == Int64(checkpoint.treeSize / 256))

        let leaves = Mutex<[MerkleTree.Hash]>([])
        try await reader.records(.init()) { record in
          leaves.withLock { $0.append(MerkleTree.leafHash(Array(record.leaf))) }
          return true
        }
        let all = leaves.withLock { $0 }[..<Int(checkpoint.treeSize)]
        #expect(MerkleTree.root(all) == checkpoint.rootHash)
        for index in [0, 200, 255, 256, 300, 511, 512, 513, 699] {
          let proof = try await reader.client.getInclusionProof(.with {
            $0.index = UInt64(index)
            $0.treeSize = checkpoint.treeSize
          }, metadata: actingOn("tiles"))
          #expect(proof.hashes.map { Array($0) } == MerkleTree.inclusionProof(index: index, all), "inclusion \(index)")
          try verifier.verifyInclusion(index: UInt64(index), leaf: Array(proof.leaf), proof: proof.hashes.map { Array($0) }, checkpoint: checkpoint)
        }
        for old in [1, 255, 256, 257, 511, 512, 600, 699] {
          let proof = try await reader.consistencyProof(old: UInt64(old), new: checkpoint.treeSize)
          #expect(proof == MerkleTree.consistencyProof(oldSize: old, all), "consistency \(old)")
        }

        // Leaves appended before migration 8 have no leaf_hash; their level-0 node rows serve.
        try await gw.adminSQL(
          """
          INSERT INTO audit_nodes (tenant_id, level, node_index, hash)
          SELECT tenant_id, 0, leaf_index, sha256('\\x00'::bytea || leaf) FROM audit_leaves
          WHERE tenant_id = 'tiles' AND leaf_index < 300
          """,
          "UPDATE audit_leaves SET leaf_hash = NULL WHERE tenant_id = 'tiles' AND leaf_index < 300"
        )
        for index in [0, 255, 256, 299, 300] {
          let proof = try await reader.client.getInclusionProof(.with {
            $0.index = UInt64(index)
            $0.treeSize = checkpoint.treeSize
          }, metadata: actingOn("tiles"))
          #expect(proof.hashes.map { Array($0) } == MerkleTree.inclusionProof(index: index, all), "legacy inclusion \(index)")
        }
      }
    }
  }

  @Test func rotatedKeyLeavesEarlierCheckpointsVerifiable() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 3)
      let op = try gw.pki.issueOperator()
      let oldKey = AuditVerifierKey(name: gw.pki.auditKey.name, publicKey: gw.pki.auditKey.publicKey)
      let oldNote = try await gw.withClient(op) { client async throws in
        try await AuditReader(client: client, metadata: actingOn("acme")).checkpoint().signedNote
      }
      let newKey = try AuditSigningKey(name: "test-audit-2026")
      let newKeyFile = gw.pki.directory.appendingPathComponent("audit-2026.key")
      try PEMFiles.write(newKey.signerText + "\n", to: newKeyFile.path, secret: true)
      // The gateway restarts with the new key (stopped first: while both run, either may sign a
      // given size, which is fine for verifiers but would make this test's key check a race).
      await gw.stop()
      try await gw.withReplica(configure: { $0.auditSigningKeyPath = newKeyFile.path }) { replica in
        try await Self.mutate(replica, "acme", count: 2)
        try await replica.withClient(op) { client async throws in
          let reader = AuditReader(client: client, metadata: actingOn("acme"))
          let latest = try await reader.checkpoint()
          #expect(latest.keyName == "test-audit-2026")
          #expect(Array(latest.publicKey) == newKey.publicKey)
          let newVerifier = AuditLogVerifier(key: AuditVerifierKey(name: newKey.name, publicKey: newKey.publicKey))
          let oldVerifier = AuditLogVerifier(key: oldKey)
          let new = try newVerifier.checkpoint(note: latest.signedNote)
          let old = try oldVerifier.checkpoint(note: oldNote)
          // The old checkpoint still verifies under the old key, and the new tree extends it.
          try newVerifier.verifyConsistency(
            old: old,
            new: new,
            proof: try await reader.consistencyProof(old: old.treeSize, new: new.treeSize)
          )
          #expect(throws: AuditVerificationFailure.self) { try oldVerifier.checkpoint(note: latest.signedNote) }
        }
      }
    }
  }

  @Test func aClientsDefaultDeadlineBoundsUnaryCallsButNotStreams() async throws {
    // tollctl's 30 s default once ended every export, verification and usage feed that ran
    // longer: a call's own nil timeout is filled in from the connection's method config. A
    // nanosecond default shows both sides at once, without waiting: it has passed before any call
    // is sent.
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 1)
      var connection = try gw.connection(try gw.pki.issueOperator())
      connection.defaultTimeout = .nanoseconds(1)
      try await connection.withClient { client async throws in
        let reader = AuditReader(client: client, metadata: actingOn("acme"))
        #expect(await statusCode { try await reader.checkpoint() } == .deadlineExceeded)
        #expect(try await Self.firstFollowedUpdate(reader) == Self.updateQuota)
      }
    }
  }

  /// The method of the first UpdateQuota record a following StreamEvents gets (nil if the stream
  /// ends without one).
  static func firstFollowedUpdate(_ reader: AuditReader<some ClientTransport>) async throws -> String? {
    let first = Mutex<String?>(nil)
    try await reader.records(.with {
      $0.follow = true
      $0.methods = [updateQuota]
    }) { record in
      first.withLock { $0 = record.event.method }
      return false
    }
    return first.withLock { $0 }
  }

  @Test(arguments: [(Duration.milliseconds(100), true), (.seconds(10), false)])
  func aFollowersKeepalivePingsNeedTheGatewaysLeave(permitted: Duration, followerSurvives: Bool) async throws {
    // A follower of a quiet log reads nothing, so only its keepalive pings can find a dead
    // connection, and the gateway must accept them. What is tested is pings over time, so the
    // test lets time pass (2 s: about ten pings at 200 ms) instead of waiting for an event. A
    // gateway that allows a ping per 10 s closes the connection at the third early one, at
    // about 0.8 s. The client's own timeout is longer than its interval, which in grpc-swift
    // never expires, so that only the gateway can end the stream.
    try await TestGateway.run(configure: { $0.minClientPingInterval = permitted }) { gw in
      try await Self.createTenant(gw, "acme")
      var connection = try gw.connection(try gw.pki.issueOperator())
      connection.keepalive = .init(time: .milliseconds(200), timeout: .seconds(5))
      try await connection.withClient { client async throws in
        let reader = AuditReader(client: client, metadata: actingOn("acme"))
        let seen = Mutex<String?>(nil)
        let follower = Task {
          await statusCode {
            let method = try await Self.firstFollowedUpdate(reader)
            seen.withLock { $0 = method }
          }
        }
        try await Task.sleep(for: .seconds(2))
        try await Self.mutate(gw, "acme", count: 1)
        let code = await follower.value
        if followerSurvives {
          #expect(code == nil)
          #expect(seen.withLock { $0 } == Self.updateQuota)
        } else {
          #expect(code == .unavailable)
          #expect(seen.withLock { $0 } == nil)
        }
      }
    }
  }

  @Test func theClientsDeadlineFreeMethodsAreExactlyTheAPIsStreams() {
    // The client lists its services by hand; a service added to the API without being added
    // there would have its streams cut at the default deadline again.
    let streams = Set(MethodCatalog.shapes.filter { $0.value.clientStreaming || $0.value.serverStreaming }.keys)
    let deadlineFree = Set(GatewayConnection.streamingMethods.map { "\($0.service)/\($0.method)" })
    #expect(!streams.isEmpty)
    #expect(deadlineFree == streams)
  }

  @Test func concurrentAppendsFromTwoReplicasStayGapFreeAndUnforked() async throws {
    // Mutations of one tenant serialise on its row and its log, and each UpdateQuota makes both
    // replicas reload their identity snapshot; 80 at once on a 2-core machine busy with the rest
    // of the suite can queue past the test defaults: the database's (10 s) and the client's
    // deadline (15 s), which once expired here in a CI run. Both are raised for this test alone,
    // the deadline above the database's timeout so that a slow call fails with the gateway's
    // status rather than the client's.
    let deadline = Duration.seconds(60)
    var patient = CallOptions.defaults
    patient.timeout = deadline
    try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(30) }) { gw in
      try await Self.createTenant(gw, "acme")
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      try await gw.withReplica { replica in
        try await withThrowingTaskGroup(of: Void.self) { group in
          group.addTask { try await Self.mutate(gw, "acme", count: 40, concurrently: true, deadline: deadline) }
          group.addTask { try await Self.mutate(replica, "acme", count: 40, concurrently: true, deadline: deadline) }
          // Reads go through each replica's batch buffer.
          for target in [gw, replica] {
            group.addTask { [patient] in
              try await target.withClient(partner) { client async throws in
                try await withThrowingTaskGroup(of: Void.self) { reads in
                  for _ in 0..<30 {
                    reads.addTask {
                      _ = try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init(), options: patient)
                    }
                  }
                  try await reads.waitForAll()
                }
              }
            }
          }
          try await group.waitForAll()
        }
        // Both replicas' checkpoints describe one history: the replica's is verifiable too.
        let fromReplica = try await Self.verify(replica, tenant: "acme")
        #expect(fromReplica.treeSize >= 80)
      }
      // The replica flushed its reads on shutdown; this gateway's are committed within a second,
      // so follow until the 80 mutations and 60 reads are all there (the suite's limit bounds it).
      let op = try gw.pki.issueOperator()
      let calls: Set<String> = [Self.updateQuota, "/tollgate.v1.TenantService/GetTenant"]
      try await gw.withClient(op) { client async throws in
        let counted = Mutex(0)
        try await AuditReader(client: client, metadata: actingOn("acme")).records(.with {
          $0.follow = true
          $0.methods = Array(calls)
        }) { _ in
          counted.withLock { $0 += 1; return $0 < 140 }
        }
      }
      let checkpoint = try await Self.verify(gw, tenant: "acme")
      let records = try await Self.records(gw, as: op, metadata: actingOn("acme"))
      #expect(checkpoint.treeSize >= 140)
      #expect(records.map(\.index) == Array(0..<UInt64(records.count)))
      #expect(records.filter { $0.event.method == Self.updateQuota }.count == 80)
      #expect(records.filter { $0.event.method == "/tollgate.v1.TenantService/GetTenant" }.count == 60)
    }
  }

  @Test func eventsLeftPendingByAStoppedReplicaAreIndexedAndReachFollowers() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 2)
      let op = try gw.pki.issueOperator()
      let (opened, open) = AsyncStream.makeStream(of: Void.self)
      let followed = try await withThrowingTaskGroup(of: [Tollgate_V1_AuditRecord].self) { group in
        group.addTask {
          let seen = Mutex<[Tollgate_V1_AuditRecord]>([])
          try await gw.withClient(op) { client async throws in
            try await AuditReader(client: client, metadata: actingOn("acme")).stream(.with {
              $0.follow = true
              $0.verifiedTreeSize = 1
              $0.methods = [Self.updateQuota]
            }) { message in
              switch message.item {
              case .checkpoint: open.yield()
              case .records(let batch): seen.withLock { $0 += batch.records }
              default: break
              }
              return seen.withLock { $0.count < 3 }
            }
          }
          return seen.withLock { $0 }
        }
        var iterator = opened.makeAsyncIterator()
        await iterator.next()
        // What a replica leaves behind if it stops between committing a mutation and indexing its
        // event: a row no call of this process wrote, so only the periodic sweep finds it.
        try await gw.adminSQL(
          """
          INSERT INTO audit_pending (tenant_id, leaf, event_time, method, principal, outcome)
          SELECT tenant_id, leaf, event_time, method, principal, outcome FROM audit_leaves
          WHERE tenant_id = 'acme' AND leaf_index = (
            SELECT min(leaf_index) FROM audit_leaves WHERE tenant_id = 'acme' AND method = '\(Self.updateQuota)')
          """
        )
        return try await group.next() ?? []
      }
      #expect(followed.count == 3)
      #expect(followed.last?.leaf == followed.first?.leaf)
      #expect(try await gw.count("SELECT count(*) FROM audit_pending") == 0)
      let checkpoint = try await Self.verify(gw, tenant: "acme")
      #expect(checkpoint.treeSize > followed.last?.index ?? 0)
    }
  }

  /// Opens a following StreamEvents as `auditor`, resumes `body` once the stream is open (its first
  /// message, a checkpoint, has arrived), and returns how the stream ended.
  static func whileFollowing(
    _ gw: TestGateway,
    _ auditor: CertificateAuthority.Issued,
    _ body: @Sendable () async throws -> Void
  ) async throws -> RPCError.Code? {
    let (opened, open) = AsyncStream.makeStream(of: Void.self)
    return try await withThrowingTaskGroup(of: RPCError.Code?.self) { group in
      group.addTask {
        await statusCode {
          try await gw.withClient(auditor) { client async throws in
            try await AuditReader(client: client).stream(.with {
              $0.follow = true
              $0.verifiedTreeSize = 1
            }) { message in
              if case .checkpoint = message.item { open.yield() }
              return true
            }
          }
        }
      }
      var iterator = opened.makeAsyncIterator()
      await iterator.next()
      try await body()
      return try await group.next() ?? nil
    }
  }

  /// A follower whose client goes away ends at once, even on a log nothing more is appended to.
  /// gRPC reports the reset through the RPC's cancellation handle, not by cancelling the handler's
  /// task; a follower that only noticed at its next write held its call slot until the log grew.
  @Test func aFollowerOfAQuietLogEndsWhenItsClientGoesAway() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor)
      let acme = try TenantID(validating: "acme")
      // Everything so far is committed, so once the follower has caught up nothing wakes it.
      await gw.gateway.auditBuffer.allCommitted()
      let (caughtUp, signal) = AsyncStream.makeStream(of: Void.self)
      let follower = Task {
        try await gw.withClient(auditor) { client async throws in
          try await AuditReader(client: client).stream(.with { $0.follow = true }) { message in
            // The checkpoint comes after the records it covers.
            if case .checkpoint = message.item { signal.yield() }
            return true
          }
        }
      }
      var iterator = caughtUp.makeAsyncIterator()
      await iterator.next()
      #expect(gw.gateway.quotaLimiter.inFlight(acme) == 1)
      follower.cancel()
      _ = await follower.result
      #expect(try await QuotaTests.eventually(within: .seconds(10)) { gw.gateway.quotaLimiter.inFlight(acme) == 0 })
    }
  }

  @Test func fullAuditBufferRefusesReadsRatherThanRunThemUnaudited() async throws {
    try await TestGateway.run(configure: { $0.auditBufferCapacity = 2 }) { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 1)
      // A log's first event waits in audit_pending for the sequencer, which creates the log's
      // head row; index it now, so that there is a head row to lock below.
      await gw.gateway.auditSequencer.sequenceAll()
      #expect(try await gw.count("SELECT count(*) FROM audit_logs WHERE tenant_id = 'acme'") == 1)
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      let getTenant: @Sendable () async -> RPCError.Code? = {
        await statusCode {
          try await gw.withClient(partner) { client async throws in
            try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
          }
        }
      }
      // A stuck database, as far as acme's log is concerned: its head row is locked elsewhere.
      let config = PostgresConnection.Configuration(
        host: gw.database.admin.host,
        port: gw.database.admin.port,
        username: gw.database.admin.username,
        password: gw.database.admin.password,
        database: gw.database.name,
        tls: .disable
      )
      let blocker = try await PostgresConnection.connect(configuration: config, id: 9, logger: testLogger)
      try await blocker.query("BEGIN", logger: testLogger)
      try await blocker.query("SELECT 1 FROM audit_logs WHERE tenant_id = 'acme' FOR UPDATE", logger: testLogger)
      #expect(await getTenant() == nil)  // runs; its event now waits on the lock
      #expect(await getTenant() == nil)
      #expect(await getTenant() == .unavailable)  // two events wait: refused, not run
      #expect(gw.gateway.auditBuffer.outstanding == 2)
      try await blocker.query("COMMIT", logger: testLogger)
      try await blocker.close()
      // The flusher may still be finishing its append, or backing off from one that timed out
      // behind the lock; until it commits, the buffer is still full and would refuse the reader.
      await gw.gateway.auditBuffer.allCommitted()

      // Reads run again; follow until the events of the two reads that ran are in the log.
      let op = try gw.pki.issueOperator()
      try await gw.withClient(op) { client async throws in
        try await AuditReader(client: client, metadata: actingOn("acme")).records(.with {
          $0.follow = true
          $0.methods = ["/tollgate.v1.TenantService/GetTenant"]
        }) { _ in false }
      }
      #expect(await getTenant() == nil)
    }
  }

  /// A flush whose COMMIT went unanswered but took effect is retried with the same events first;
  /// they must not be recorded twice. A try that did not commit, while another appender took the
  /// index it had tried, must keep all its events.
  @Test func retryAfterAnUnansweredCommitRecordsItsEventsOnce() async throws {
    try await TestGateway.run { gw in
      let repository = AuditLogRepository(database: gw.gateway.database)
      let events = (0..<9).map {
        AuditEventBuilder.entry(scope: nil, tenant: nil, method: "/test/Retry\($0)", resource: "", code: 0, message: "")
      }
      let start = try await gw.count("SELECT count(*) FROM audit_leaves WHERE tenant_id = '_platform'")

      // The first try commits, but the flusher saw an error: it keeps the attempt unsettled and
      // retries the same events, now followed by two that queued since.
      let answerLost = AuditAppendAttempt()
      try await repository.append(Array(events[0..<3]), attempt: answerLost, logger: testLogger)
      try await repository.append(Array(events[0..<5]), attempt: answerLost, logger: testLogger)

      // A try of events 5 and 6 that rolled back, after which another appender wrote events 7
      // and 8 from the index that try had begun at: as many as the try had.
      let rolledBack = AuditAppendAttempt()
      rolledBack.record(
        .platform, first: UInt64(start + 5), count: 2, firstLeafHash: MerkleTree.leafHash(events[5].leaf.readableBytesView))
      try await repository.append(Array(events[7..<9]), logger: testLogger)
      try await repository.append(Array(events[5..<7]), attempt: rolledBack, logger: testLogger)

      let methods = try await gw.strings(
        "SELECT method FROM audit_leaves WHERE tenant_id = '_platform' AND leaf_index >= \(start) ORDER BY leaf_index")
      #expect(methods == [0, 1, 2, 3, 4, 7, 8, 5, 6].map { "/test/Retry\($0)" })
    }
  }

  /// A call whose response never ran (the client went away) is recorded as CANCELLED when its
  /// record is released; a mutating one's record too goes through the buffer, which retries it
  /// until it commits instead of dropping it on a first failure.
  @Test func aMutatingCallWhoseClientWentAwayIsRecordedThroughTheBuffer() async throws {
    try await TestGateway.run { gw in
      let repository = AuditLogRepository(database: gw.gateway.database)
      let buffer = AuditBuffer(capacity: 10, repository: repository, logger: testLogger, linger: .zero)
      let alice = Principal(
        spiffeID: SPIFFEID(operatorNamed: "alice", trustDomain: gw.pki.ca.trustDomain),
        certificateSHA256: String(repeating: "ab", count: 32),
        serialHex: "1"
      )
      _ = AuditedCall(
        scope: CallScope(principal: alice, tenant: nil, impersonated: false),
        method: MethodDescriptor(fullyQualifiedService: "test.Gone", method: "Mutate"),
        traceID: "",
        mutating: true,
        buffer: buffer,
        repository: repository,
        tenantExists: { _ in false },
        logger: testLogger
      )
      #expect(buffer.outstanding == 1)
      let group = ServiceGroup(configuration: .init(services: [buffer], gracefulShutdownSignals: [], logger: testLogger))
      try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        await buffer.allCommitted()
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
      }
      #expect(
        try await gw.count(
          "SELECT count(*) FROM audit_leaves WHERE tenant_id = '_platform' AND method = '/test.Gone/Mutate' AND outcome = 1"
        ) == 1)
    }
  }

  /// A mutation refused because the database was out of reach changed nothing. Its record waits
  /// in the buffer until the database is back; appended on the call's path it made the caller
  /// wait out a second database timeout, and was then dropped when that append failed too.
  @Test func aMutationRefusedInADatabaseOutageIsRecordedOnceTheDatabaseIsBack() async throws {
    // Only the first call of the outage waits out the timeout (the store then finds the database
    // down); the calls after it need room on a machine the rest of the suite loads.
    try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(5) }) { gw in
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        _ = try await tenants.createTenant(.with { $0.tenantID = "acme" })
        try await gw.takeDatabaseAway()
        let refused = await statusCode {
          try await tenants.suspendTenant(.with { $0.tenantID = "acme"; $0.reason = "during the outage" })
        }
        #expect(refused == .unavailable)
        try await gw.bringDatabaseBack()
        await gw.gateway.auditBuffer.allCommitted()
        #expect(try await tenants.getTenant(.with { $0.tenantID = "acme" }).tenant.state == .active)
      }
      let recorded = try await gw.count(
        "SELECT count(*) FROM audit_leaves WHERE tenant_id = 'acme' AND method = '/tollgate.v1.TenantService/SuspendTenant' AND outcome = 14"
      )
      #expect(recorded == 1)
    }
  }

  /// A window of records comes back from the database as one framed value. Its order is
  /// PostgreSQL's to keep but not to promise, so it is checked and restored; a frame cut short is
  /// reported as damage, never read as a shorter record.
  @Test func framedWindowsAreReadInIndexOrderAndCutFramesRefused() throws {
    func frame(_ records: [(Int64, [UInt8])]) -> ByteBuffer {
      var buffer = ByteBuffer()
      for (index, leaf) in records {
        buffer.writeInteger(index)
        buffer.writeInteger(Int32(leaf.count))
        buffer.writeBytes(leaf)
      }
      return buffer
    }
    let shuffled = frame([(7, [7, 7]), (5, [5]), (6, [])])
    let read = try AuditLogRepository.unframe(shuffled, from: 5, below: 8)
    #expect(read.map(\.index) == [5, 6, 7])
    #expect(read.map { Array($0.leaf.readableBytesView) } == [[5], [], [7, 7]])
    #expect(try AuditLogRepository.unframe(nil, from: 0, below: 10).isEmpty)
    var cut = frame([(1, [1, 2, 3])])
    cut.moveWriterIndex(to: cut.writerIndex - 1)
    #expect(throws: StoreError.self) { try AuditLogRepository.unframe(cut, from: 1, below: 2) }
  }

  /// Shutdown must not wait out the flush linger: the final flush takes what has gathered. An
  /// hour's linger makes a flusher that waited it out fail the suite's time limit instead.
  @Test func shutdownCutsTheFlushLingerShortAndCommitsWhatGathered() async throws {
    try await TestGateway.run { gw in
      let repository = AuditLogRepository(database: gw.gateway.database)
      let buffer = AuditBuffer(capacity: 100, repository: repository, logger: testLogger, linger: .seconds(3600))
      let group = ServiceGroup(configuration: .init(services: [buffer], gracefulShutdownSignals: [], logger: testLogger))
      try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        buffer.submit(
          AuditEventBuilder.entry(scope: nil, tenant: nil, method: "/test/Linger", resource: "", code: 0, message: ""))
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
      }
      #expect(buffer.outstanding == 0)
      #expect(try await gw.count("SELECT count(*) FROM audit_leaves WHERE tenant_id = '_platform' AND method = '/test/Linger'") == 1)
    }
  }

  @Test func drainEndsFollowingStreamsWithUnavailable() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenant(gw, "acme")
      try await Self.mutate(gw, "acme", count: 1)
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor)
      let ended = try await Self.whileFollowing(gw, auditor) { await gw.beginShutdown() }
      #expect(ended == .unavailable)
    }
  }
}

