import Foundation
public import GRPCCore
import GRPCProtobuf
public import Logging
public import NIOCore
import SwiftProtobuf
import TollgateCore
import TollgateMerkle
import TollgateModel
public import TollgateProtos
import TollgateServiceSupport
public import TollgateStore

/// AuditService: streams a log's records and serves its checkpoints and proofs.
///
/// The log read is the caller's scope: an auditor's own tenant, an operator's `tollgate-tenant`,
/// or the platform log for an operator naming none. Records go out exactly as stored: the leaf
/// bytes are never re-serialized.
public struct AuditService: RegistrableRPCService {
  let repository: AuditLogRepository
  let checkpointer: Checkpointer
  let notifier: AuditNotifier
  let logger: Logger
  /// Records per database read of a stream.
  let pageSize = 20_000
  /// Target size of one message of records (clients accept 4 MiB by default).
  static let batchBytes = 1 << 20
  /// Least time between the checkpoints a following stream sends.
  let followCheckpointInterval: Duration = .seconds(1)

  public init(repository: AuditLogRepository, checkpointer: Checkpointer, notifier: AuditNotifier, logger: Logger) {
    self.repository = repository
    self.checkpointer = checkpointer
    self.notifier = notifier
    self.logger = logger
  }

  public func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
    // StreamEvents writes records with a serializer that frames the stored bytes directly.
    router.registerHandler(
      forMethod: Tollgate_V1_AuditService.Method.StreamEvents.descriptor,
      deserializer: ProtobufDeserializer<Tollgate_V1_StreamEventsRequest>(),
      serializer: AuditStreamSerializer(),
      handler: { request, context in
        let message = try await ServerRequest(stream: request).message
        return StreamingServerResponse { writer in
          try await handling("StreamEvents") {
            try await self.streamEvents(message, writer: writer)
          }
          return [:]
        }
      }
    )
    registerUnary(Tollgate_V1_AuditService.Method.GetCheckpoint.descriptor, with: &router) {
      (_: Tollgate_V1_GetCheckpointRequest) in
      let checkpoint = try await checkpointer.current(try log())
      return Tollgate_V1_GetCheckpointResponse.with { $0.checkpoint = Self.proto(checkpoint) }
    }
    registerUnary(Tollgate_V1_AuditService.Method.GetInclusionProof.descriptor, with: &router) {
      try await inclusionProof($0)
    }
    registerUnary(Tollgate_V1_AuditService.Method.GetConsistencyProof.descriptor, with: &router) {
      try await consistencyProof($0)
    }
  }

  private func registerUnary<Transport: ServerTransport, Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
    _ method: MethodDescriptor,
    with router: inout RPCRouter<Transport>,
    _ body: @escaping @Sendable (Request) async throws -> Response
  ) {
    router.registerHandler(
      forMethod: method,
      deserializer: ProtobufDeserializer<Request>(),
      serializer: ProtobufSerializer<Response>(),
      handler: { request, context in
        let message = try await ServerRequest(stream: request).message
        let response = try await handling(method.method) { try await body(message) }
        return StreamingServerResponse(single: ServerResponse(message: response))
      }
    )
  }

  func handling<T: Sendable>(_ method: String, _ body: () async throws -> T) async throws -> T {
    try await handlingStoreFailures(method, logger: logger, body)
  }

  /// The log the caller reads.
  func log() throws(TollgateError) -> AuditLogID {
    AuditLogID(tenant: try CallScope.required().tenant)
  }

  // MARK: Proofs

  /// The current checkpoint, which must cover `size` records (named by request field `field`).
  func checkpoint(covering size: UInt64, _ log: AuditLogID, field: String) async throws -> StoredCheckpoint {
    let current = try await checkpointer.current(log)
    guard size <= current.treeSize else {
      throw TollgateError.invalidField(field, "is \(size) but the log has \(current.treeSize) records")
    }
    return current
  }

  func inclusionProof(_ request: Tollgate_V1_GetInclusionProofRequest) async throws -> Tollgate_V1_GetInclusionProofResponse {
    let log = try log()
    let current = try await checkpoint(covering: request.treeSize, log, field: "tree_size")
    let size = request.treeSize == 0 ? current.treeSize : request.treeSize
    guard request.index < size else {
      throw TollgateError.invalidField("index", "is \(request.index) but must be below tree_size \(size)")
    }
    let hashes = try await proof(log) { node in MerkleTree.inclusionProof(index: request.index, treeSize: size, node: node) }
    guard let leaf = try await repository.leaf(log, index: request.index, logger: logger) else {
      throw StoreError.damaged(
        "record \(request.index) is missing from the audit log below its checkpoint's size; verify the log to locate the damage")
    }
    return .with {
      $0.index = request.index
      $0.treeSize = size
      $0.hashes = hashes.map { Data($0) }
      $0.leaf = Data(leaf.readableBytesView)
    }
  }

  func consistencyProof(_ request: Tollgate_V1_GetConsistencyProofRequest) async throws -> Tollgate_V1_GetConsistencyProofResponse {
    let log = try log()
    let current = try await checkpoint(covering: request.newSize, log, field: "new_size")
    let newSize = request.newSize == 0 ? current.treeSize : request.newSize
    guard request.oldSize > 0, request.oldSize <= newSize else {
      throw TollgateError.invalidField("old_size", "is \(request.oldSize) but must be between 1 and new_size \(newSize)")
    }
    let proof = try await consistency(log, from: request.oldSize, to: newSize)
    return .with { $0.proof = proof }
  }

  func consistency(_ log: AuditLogID, from old: UInt64, to new: UInt64) async throws -> Tollgate_V1_ConsistencyProof {
    let hashes = try await proof(log) { node in MerkleTree.consistencyProof(oldSize: old, newSize: new, node: node) }
    return .with {
      $0.oldSize = old
      $0.newSize = new
      $0.hashes = hashes.map { Data($0) }
    }
  }

  /// Fetches the subtree hashes `compute` reads, in one transaction, then runs it.
  func proof(
    _ log: AuditLogID,
    _ compute: ((NodeAddress) -> MerkleTree.Hash) -> [MerkleTree.Hash]
  ) async throws -> [MerkleTree.Hash] {
    let nodes = try await repository.subtreeHashes(log, MerkleTree.nodesNeeded(compute), logger: logger)
    return compute { nodes[$0]! }
  }

  static func proto(_ checkpoint: StoredCheckpoint) -> Tollgate_V1_Checkpoint {
    // The origin is the signed note's first line, as signed.
    let origin = String(checkpoint.signedNote.prefix { $0 != "\n" })
    return .with {
      $0.body = Checkpoint(origin: origin, treeSize: checkpoint.treeSize, rootHash: checkpoint.rootHash).body
      $0.signedNote = checkpoint.signedNote
      $0.origin = origin
      $0.treeSize = checkpoint.treeSize
      $0.rootHash = Data(checkpoint.rootHash)
      $0.keyName = checkpoint.keyName
      $0.publicKey = Data(checkpoint.publicKey)
      $0.createTime = Google_Protobuf_Timestamp(date: checkpoint.createTime)
    }
  }

  // MARK: StreamEvents

  static let maxOutcomeCode: Int32 = 16

  /// A full method name as audit events record it (`/package.Service/Method`): printable, and no
  /// longer than any method could be.
  static func isMethodName(_ text: String) -> Bool {
    text.hasPrefix("/") && text.contains(".") && text.utf8.count <= 256 && !RequestFields.hasControlCharacters(text)
  }

  func filter(_ request: Tollgate_V1_StreamEventsRequest) throws(TollgateError) -> AuditFilter {
    var violations: [TollgateError.FieldViolation] = []
    var filter = AuditFilter()
    if request.hasRange {
      if request.range.hasStartTime {
        let t = request.range.startTime
        filter.from = RequestFields.date(seconds: t.seconds, nanos: t.nanos)
        if filter.from == nil { violations.append(.init(field: "range.start_time", description: RequestFields.timestampRange)) }
      }
      if request.range.hasEndTime {
        let t = request.range.endTime
        filter.until = RequestFields.date(seconds: t.seconds, nanos: t.nanos)
        if filter.until == nil { violations.append(.init(field: "range.end_time", description: RequestFields.timestampRange)) }
      }
      if let from = filter.from, let until = filter.until, until <= from {
        violations.append(.init(field: "range.end_time", description: "must be after range.start_time"))
      }
    }
    filter.methods = request.methods
    for (i, method) in request.methods.enumerated() where !Self.isMethodName(method) {
      violations.append(
        .init(field: "methods[\(i)]", description: "'\(TollgateError.clipped(method, maxBytes: 80))' is not a full method name like /tollgate.v1.TenantService/GetTenant")
      )
    }
    filter.principal = request.principalSpiffeID.isEmpty ? nil : request.principalSpiffeID
    if let principal = filter.principal, principal.utf8.count > 2048 || RequestFields.hasControlCharacters(principal) {
      violations.append(.init(field: "principal_spiffe_id", description: "must be a SPIFFE ID: at most 2048 bytes, no control characters"))
    }
    filter.outcomes = request.outcomeCodes
    for (i, code) in request.outcomeCodes.enumerated() where code < 0 || code > Self.maxOutcomeCode {
      violations.append(.init(field: "outcome_codes[\(i)]", description: "\(code) is not a gRPC status code (0-16)"))
    }
    if !violations.isEmpty { throw .invalidFields("stream request", violations) }
    return filter
  }

  func streamEvents(_ request: Tollgate_V1_StreamEventsRequest, writer: RPCWriter<AuditStreamItem>) async throws {
    let log = try log()
    let filter = try filter(request)
    // Subscribed before the first read, so a commit between a read and the wait still wakes us.
    let subscription = request.follow ? notifier.subscribe(log) : nil
    defer { subscription?.1.finish() }
    var lastCheckpoint: StoredCheckpoint?
    var lastCheckpointSent = ContinuousClock.now
    if request.verifiedTreeSize > 0 {
      let current = try await checkpoint(covering: request.verifiedTreeSize, log, field: "verified_tree_size")
      try await write(current, provingFrom: request.verifiedTreeSize, log, to: writer)
      lastCheckpoint = current
    }
    // Answered calls' events are readable: index any this log's mutations committed just now.
    try await repository.sequencePending(only: log, logger: logger)
    var next = request.startIndex
    var wakeUps = subscription?.0.makeAsyncIterator()
    while true {
      let size = try await repository.head(log, logger: logger).size
      let sent = next < size
      next = try await send(log, from: next, below: size, filter: filter, to: writer)
      guard request.follow else { return }
      // A following client gets checkpoints as the log grows (at most one a second), each after
      // the first with the proof from the one before, so the feed stays verifiable by itself.
      if sent, lastCheckpoint == nil || ContinuousClock.now - lastCheckpointSent >= followCheckpointInterval {
        let current = try await checkpointer.current(log)
        if current.treeSize > lastCheckpoint?.treeSize ?? 0 {
          try await write(current, provingFrom: lastCheckpoint?.treeSize ?? 0, log, to: writer)
          lastCheckpoint = current
          lastCheckpointSent = .now
        }
      }
      // Ends when the client cancels (the stream's iterator returns nil on cancellation).
      guard
        try await nextWakeUp(
          &wakeUps!,
          stop: { [continuation = subscription?.1] in continuation?.finish() },
          drainMessage: "the gateway is shutting down; reconnect with start_index \(next)"
        )
      else { return }
    }
  }
}

extension AuditService {
  /// Writes `checkpoint`, then the proof that the tree of `oldSize` records is its prefix (none
  /// when `oldSize` is 0: there is nothing to prove).
  func write(
    _ checkpoint: StoredCheckpoint,
    provingFrom oldSize: UInt64,
    _ log: AuditLogID,
    to writer: RPCWriter<AuditStreamItem>
  ) async throws {
    try await writer.write(.message(.with { $0.checkpoint = Self.proto(checkpoint) }))
    guard oldSize > 0 else { return }
    let proof = try await consistency(log, from: oldSize, to: checkpoint.treeSize)
    try await writer.write(.message(.with { $0.consistencyProof = proof }))
  }

  /// Writes the records of `[from, below)` that match `filter`, one window of `pageSize` indices
  /// per database read, reading the next window while the current one is written. Returns `below`.
  ///
  /// Indices are gap-free, so a window bounds the rows a read can return (at most `pageSize`)
  /// without a LIMIT: each read scans a fixed slice of the primary key, whatever the planner's
  /// statistics say. (A `LIMIT` over the open range let a stale estimate pick a sort of the whole
  /// remaining range per page, quadratic over a long stream.)
  func send(
    _ log: AuditLogID,
    from: UInt64,
    below size: UInt64,
    filter: AuditFilter,
    to writer: RPCWriter<AuditStreamItem>
  ) async throws -> UInt64 {
    guard from < size else { return max(from, size) }
    let repository = self.repository
    let logger = self.logger
    let window = UInt64(pageSize)
    let fetch: @Sendable (UInt64) async throws -> [(index: UInt64, leaf: ByteBuffer)] = { start in
      try await repository.records(log, from: start, below: min(start + window, size), filter: filter, logger: logger)
    }
    var start = from
    var pending: Task<[(index: UInt64, leaf: ByteBuffer)], any Error>? = Task { try await fetch(from) }
    defer { pending?.cancel() }
    while let current = pending {
      let page = try await current.value
      start = min(start + window, size)
      let nextStart = start
      pending = nextStart < size ? Task { try await fetch(nextStart) } : nil
      // Batches of about 1 MiB: one gRPC message per record costs more than the record itself.
      var batches: [AuditStreamItem] = []
      var batch: [(index: UInt64, leaf: ByteBuffer)] = []
      var bytes = 0
      for record in page {
        if !batch.isEmpty && bytes + 2 * record.leaf.readableBytes > Self.batchBytes {
          batches.append(.records(batch))
          batch = []
          bytes = 0
        }
        batch.append(record)
        bytes += 2 * record.leaf.readableBytes + 16
      }
      if !batch.isEmpty { batches.append(.records(batch)) }
      if !batches.isEmpty { try await writer.write(contentsOf: batches) }
    }
    return size
  }
}

/// One message of StreamEvents: stored records, framed without decoding them, or any other message.
public enum AuditStreamItem: Sendable {
  case records([(index: UInt64, leaf: ByteBuffer)])
  case message(Tollgate_V1_StreamEventsResponse)
}

/// Writes records as `StreamEventsResponse{records: AuditRecordBatch{records: [AuditRecord{index,
/// leaf, event}]}}` straight from the stored bytes. The leaf is a serialized AuditEvent, so the
/// same bytes are also the encoding of the `event` field: a record costs two copies instead of a
/// decode and a re-encode.
struct AuditStreamSerializer: MessageSerializer {
  func serialize<Bytes: GRPCContiguousBytes>(_ item: AuditStreamItem) throws -> Bytes {
    switch item {
    case .message(let message):
      return try ProtobufSerializer<Tollgate_V1_StreamEventsResponse>().serialize(message)
    case .records(let records):
      // AuditRecord: index = 1 (varint), leaf = 2 (bytes), event = 3 (message, the same bytes).
      let recordLengths = records.map { record in
        let leaf = record.leaf.readableBytes
        return 1 + Self.varintSize(record.index) + 2 * (1 + Self.varintSize(UInt64(leaf)) + leaf)
      }
      // AuditRecordBatch.records = 1, each length-delimited.
      let batchLength = recordLengths.reduce(0) { $0 + 1 + Self.varintSize(UInt64($1)) + $1 }
      // Written in place into the transport's buffer: one copy of each leaf per field, no more.
      var bytes = Bytes(repeating: 0, count: 1 + Self.varintSize(UInt64(batchLength)) + batchLength)
      bytes.withUnsafeMutableBytes { out in
        var at = 0
        func byte(_ value: UInt8) {
          out[at] = value
          at += 1
        }
        func varint(_ value: UInt64) {
          var value = value
          while value >= 0x80 {
            byte(UInt8(value & 0x7F) | 0x80)
            value >>= 7
          }
          byte(UInt8(value))
        }
        byte(0x22)  // StreamEventsResponse.records = 4, length-delimited
        varint(UInt64(batchLength))
        for (record, length) in zip(records, recordLengths) {
          byte(0x0A)
          varint(UInt64(length))
          byte(0x08)
          varint(record.index)
          for tag: UInt8 in [0x12, 0x1A] {
            byte(tag)
            varint(UInt64(record.leaf.readableBytes))
            record.leaf.withUnsafeReadableBytes { leaf in
              UnsafeMutableRawBufferPointer(rebasing: out[at..<(at + leaf.count)]).copyMemory(from: leaf)
              at += leaf.count
            }
          }
        }
      }
      return bytes
    }
  }

  static func varintSize(_ value: UInt64) -> Int {
    var value = value
    var size = 1
    while value >= 0x80 {
      value >>= 7
      size += 1
    }
    return size
  }
}
