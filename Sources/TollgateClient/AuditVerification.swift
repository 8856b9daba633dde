import Foundation
public import GRPCCore
import GRPCProtobuf
import SwiftProtobuf
public import TollgateMerkle
public import TollgateProtos

/// Why an audit log did not verify. ``firstBadIndex`` names the first record that is wrong
/// when it can be known.
public enum AuditVerificationFailure: Error, CustomStringConvertible, Equatable, Sendable {
  /// The checkpoint's signature or body does not check out with the key.
  case checkpoint(String)
  /// Record `index` is absent: the records jump from `index - 1` to a later one.
  case missing(index: UInt64)
  /// A record arrived with an index at or before one already seen.
  case outOfOrder(index: UInt64)
  /// The records re-hash to a different tree; the first `index` records are provably intact and
  /// record `index` is not (found with consistency proofs against the signed root).
  case altered(index: UInt64)
  /// Fewer records than the checkpoint covers.
  case short(records: UInt64, checkpointSize: UInt64)
  /// The records do not hash to the signed root, and no gateway was at hand to locate why.
  case rootMismatch(records: UInt64)
  /// A proof from the gateway does not verify against the signed root.
  case proof(String)
  /// A range was asked to start at `start`, past the end of a signed log of `checkpointSize`
  /// records. A log never shrinks, so either the start is wrong or the log was cut back.
  case beyondEnd(start: UInt64, checkpointSize: UInt64)
  /// The log does not extend a checkpoint verified earlier: it was cut back, or records the earlier
  /// checkpoint covered were rewritten and the log signed again.
  case forked(String)
  /// A proof the check needed could not be fetched (the gateway unreachable, a deadline): nothing
  /// was found wrong, and the log was not checked either.
  case unanswered(String)

  public var firstBadIndex: UInt64? {
    switch self {
    case .missing(let i), .outOfOrder(let i), .altered(let i): return i
    case .short(let records, _): return records
    case .checkpoint, .proof, .rootMismatch, .beyondEnd, .forked, .unanswered: return nil
    }
  }

  /// Fetching `what` failed with `error`. The gateway's DATA_LOSS (records or hashes missing from
  /// its store) is damage found; anything else only means the check could not be made.
  static func fetching(_ what: String, _ error: any Error) -> AuditVerificationFailure {
    if let rpc = error as? RPCError, rpc.code == .dataLoss {
      return .proof("fetching \(what): the gateway reports the log damaged: \(rpc.message)")
    }
    return .unanswered("fetching \(what): \(error)")
  }

  public var description: String {
    switch self {
    case .checkpoint(let why): return "checkpoint does not verify: \(why)"
    case .missing(let i): return "record \(i) is missing (first bad index \(i))"
    case .outOfOrder(let i): return "record \(i) is out of order (first bad index \(i))"
    case .altered(let i):
      return "record \(i) was altered, removed or reordered: records 0..<\(i) match the signed tree and \(i) does not (first bad index \(i))"
    case .short(let n, let size): return "only \(n) records for a checkpoint of \(size) (first bad index \(n))"
    case .rootMismatch(let n):
      return "the \(n) records do not hash to the signed root: something was altered, removed or reordered (connect to the gateway to locate the first bad index)"
    case .proof(let why): return "proof does not verify: \(why)"
    case .beyondEnd(let start, let size):
      return "the signed log holds \(size) records, so there is no record \(start) to start from: if an earlier check saw more than \(size) records, the log was cut back"
    case .forked(let why): return "the log does not extend the checkpoint verified earlier: \(why)"
    case .unanswered(let why): return "could not check: \(why)"
    }
  }
}

/// Checks an audit log without trusting the gateway: only the published verifier key is trusted.
public struct AuditLogVerifier: Sendable {
  public let key: AuditVerifierKey

  public init(key: AuditVerifierKey) {
    self.key = key
  }

  /// Verifies the signed note and returns the checkpoint it signs.
  public func checkpoint(note: String) throws(AuditVerificationFailure) -> Checkpoint {
    let body: String
    do {
      body = try NoteSignature.verify(note: note, keyName: key.name, publicKey: key.publicKey)
    } catch {
      throw .checkpoint("\(error) (key \(key.name))")
    }
    guard let checkpoint = Checkpoint(body: body) else { throw .checkpoint("the body is not a checkpoint") }
    return checkpoint
  }

  /// Re-computes the tree from `records` (index and exact leaf bytes, from index 0, in order)
  /// and checks it against the signed checkpoint. Records past the checkpoint's size are ignored.
  ///
  /// When the root differs, `consistencyProof(m, n)` (the gateway's GetConsistencyProof) locates
  /// the first bad record: a prefix of m records verifies against the signed root only if it is
  /// intact, so a binary search over m finds the first record that is not.
  public func verifyLog(
    records: [(index: UInt64, leaf: [UInt8])],
    checkpointNote: String,
    consistencyProof: ((UInt64, UInt64) async throws -> [MerkleTree.Hash])?
  ) async throws(AuditVerificationFailure) -> Checkpoint {
    let checkpoint = try checkpoint(note: checkpointNote)
    try await verify(records, from: 0, edge: { CompactRange() }, against: checkpoint, consistencyProof: consistencyProof)
    return checkpoint
  }

  /// Checks records `start` to the checkpoint's size (in order; later ones are ignored) without
  /// the records before them. `edgeProof(start, size)` is the gateway's inclusion proof of record
  /// `start` in the checkpoint's tree (asked for once the records are known to be all there); its
  /// left siblings hash the `start` records before the range, and the range is re-hashed onto them
  /// and compared with the signed root. The edge is not trusted: wrong edge hashes cannot re-hash
  /// to that root. A mismatch is located like ``verifyLog(records:checkpointNote:consistencyProof:)``'s,
  /// once a consistency proof has shown whether the edge or the records are at fault. A range
  /// starting at the checkpoint's size is empty: only the signature is checked. One starting past
  /// it is a finding (``AuditVerificationFailure/beyondEnd(start:checkpointSize:)``): a check that
  /// resumes where the last one ended must not pass on a log that has since been cut back.
  public func verifyRange(
    from start: UInt64,
    records: [(index: UInt64, leaf: [UInt8])],
    checkpointNote: String,
    edgeProof: @escaping (UInt64, UInt64) async throws -> [MerkleTree.Hash],
    consistencyProof: ((UInt64, UInt64) async throws -> [MerkleTree.Hash])?
  ) async throws(AuditVerificationFailure) -> Checkpoint {
    let checkpoint = try checkpoint(note: checkpointNote)
    let size = checkpoint.treeSize
    if start > size { throw .beyondEnd(start: start, checkpointSize: size) }
    if start == size { return checkpoint }
    let edge = { () async throws(AuditVerificationFailure) -> CompactRange in
      let proof: [MerkleTree.Hash]
      do { proof = try await edgeProof(start, size) } catch {
        throw .fetching("the inclusion proof of record \(start)", error)
      }
      guard let edge = CompactRange(leftOf: start, treeSize: size, inclusionProof: proof) else {
        throw .proof("the inclusion proof of record \(start) is not shaped for a tree of \(size) records")
      }
      return edge
    }
    try await verify(records, from: start, edge: edge, against: checkpoint, consistencyProof: consistencyProof)
    return checkpoint
  }

  /// Checks that `records` are `start` up to the checkpoint's size, then re-hashes them onto
  /// `edge()` (the first `start` records, hashed) and compares the tree with the checkpoint's.
  func verify(
    _ records: [(index: UInt64, leaf: [UInt8])],
    from start: UInt64,
    edge fetchEdge: () async throws(AuditVerificationFailure) -> CompactRange,
    against checkpoint: Checkpoint,
    consistencyProof: ((UInt64, UInt64) async throws -> [MerkleTree.Hash])?
  ) async throws(AuditVerificationFailure) {
    let size = checkpoint.treeSize
    var hashes: [MerkleTree.Hash] = []
    hashes.reserveCapacity(Int(size - min(start, size)))
    var expected = start
    for record in records where record.index < size {
      if record.index < expected { throw .outOfOrder(index: record.index) }
      if record.index > expected { throw .missing(index: expected) }
      hashes.append(MerkleTree.leafHash(record.leaf))
      expected += 1
    }
    guard expected == size else { throw .short(records: expected, checkpointSize: size) }
    let edge = try await fetchEdge()
    // The root of the first `m` records: the edge and the range's first `m - edge.size` hashes.
    func root(of m: UInt64) -> MerkleTree.Hash {
      let range = hashes[..<Int(m - edge.size)]
      if edge.size == 0 { return MerkleTree.root(range) }
      var tree = edge
      tree.append(leafHashes: range)
      return tree.root
    }
    if root(of: size) == checkpoint.rootHash { return }
    guard let consistencyProof else { throw .rootMismatch(records: size - edge.size) }
    func fetch(_ m: UInt64) async throws(AuditVerificationFailure) -> [MerkleTree.Hash] {
      do { return try await consistencyProof(m, size) } catch { throw .fetching("the consistency proof \(m) -> \(size)", error) }
    }
    if edge.size > 0 {
      let proof = try await fetch(edge.size)
      guard MerkleTree.verifyConsistency(oldSize: edge.size, newSize: size, oldRoot: edge.root, newRoot: checkpoint.rootHash, proof: proof)
      else {
        throw .proof("the inclusion proof of record \(edge.size) does not lead to the signed root")
      }
    }
    // The whole range (m = size) is bad; find the smallest bad m in [edge.size + 1, size].
    var low = edge.size + 1
    var high = size
    while low < high {
      let m = low + (high - low) / 2
      let proof = try await fetch(m)
      let intact = MerkleTree.verifyConsistency(oldSize: m, newSize: size, oldRoot: root(of: m), newRoot: checkpoint.rootHash, proof: proof)
      if intact { low = m + 1 } else { high = m }
    }
    throw .altered(index: low - 1)
  }

  /// Checks that `checkpoint` extends `earlier`, a checkpoint of the same log verified before:
  /// every record `earlier` covered is still there, unchanged and in place. This is what makes a
  /// resumed check sound. Re-hashing records proves them against whatever root the gateway signs
  /// now, so a log rewritten and signed again would pass it; only a root remembered from before
  /// cannot be rewritten. `consistencyProof(m, n)` is the gateway's GetConsistencyProof.
  public func verifyExtends(
    _ earlier: Checkpoint,
    to checkpoint: Checkpoint,
    consistencyProof: (UInt64, UInt64) async throws -> [MerkleTree.Hash]
  ) async throws(AuditVerificationFailure) {
    try Self.sameLog(earlier, checkpoint)
    let (old, new) = (earlier.treeSize, checkpoint.treeSize)
    if new < old {
      throw .forked("it was verified at \(old) records and now holds \(new): it was cut back")
    }
    if new == old {
      guard earlier.rootHash == checkpoint.rootHash else {
        throw .forked("both hold \(old) records, and their roots differ: records were rewritten")
      }
      return
    }
    let proof: [MerkleTree.Hash]
    do { proof = try await consistencyProof(old, new) } catch { throw .fetching("the consistency proof \(old) -> \(new)", error) }
    guard MerkleTree.verifyConsistency(oldSize: old, newSize: new, oldRoot: earlier.rootHash, newRoot: checkpoint.rootHash, proof: proof)
    else {
      throw .forked("no consistency proof from \(old) to \(new) records: records the earlier checkpoint covered were rewritten")
    }
  }

  /// ``verifyExtends(_:to:consistencyProof:)`` for records at hand from index 0 (an export),
  /// already verified against `checkpoint`: the first `earlier.treeSize` of them must hash to
  /// the earlier root.
  public func verifyExtends(
    _ earlier: Checkpoint,
    to checkpoint: Checkpoint,
    records: [(index: UInt64, leaf: [UInt8])]
  ) throws(AuditVerificationFailure) {
    try Self.sameLog(earlier, checkpoint)
    let old = earlier.treeSize
    if checkpoint.treeSize < old {
      throw .forked("it was verified at \(old) records and now holds \(checkpoint.treeSize): it was cut back")
    }
    let prefix = records.prefix(Int(old)).map { MerkleTree.leafHash($0.leaf) }
    guard prefix.count == Int(old), MerkleTree.root(prefix) == earlier.rootHash else {
      throw .forked("its first \(old) records do not hash to the earlier root: records were rewritten")
    }
  }

  /// Two logs' checkpoints say nothing about each other.
  static func sameLog(_ earlier: Checkpoint, _ checkpoint: Checkpoint) throws(AuditVerificationFailure) {
    guard earlier.origin == checkpoint.origin else {
      throw .checkpoint("the earlier checkpoint is of log '\(earlier.origin)', this one of '\(checkpoint.origin)'")
    }
  }

  /// Checks that `leaf` is record `index` of the checkpointed tree, by an inclusion proof.
  public func verifyInclusion(
    index: UInt64,
    leaf: [UInt8],
    proof: [MerkleTree.Hash],
    checkpoint: Checkpoint
  ) throws(AuditVerificationFailure) {
    guard MerkleTree.verifyInclusion(
      index: index,
      treeSize: checkpoint.treeSize,
      leafHash: MerkleTree.leafHash(leaf),
      proof: proof,
      root: checkpoint.rootHash
    ) else {
      throw .altered(index: index)
    }
  }

  /// Checks that the tree of `old` is a prefix of the tree of `new`.
  public func verifyConsistency(old: Checkpoint, new: Checkpoint, proof: [MerkleTree.Hash]) throws(AuditVerificationFailure) {
    guard MerkleTree.verifyConsistency(
      oldSize: old.treeSize,
      newSize: new.treeSize,
      oldRoot: old.rootHash,
      newRoot: new.rootHash,
      proof: proof
    ) else {
      throw .proof("checkpoint of size \(old.treeSize) is not a prefix of the checkpoint of size \(new.treeSize)")
    }
  }
}

/// Reading an audit log over the API.
public struct AuditReader<Transport: ClientTransport>: Sendable {
  public let client: Tollgate_V1_AuditService.Client<Transport>
  let grpcClient: GRPCClient<Transport>
  public let metadata: Metadata

  public init(client: GRPCClient<Transport>, metadata: Metadata = [:]) {
    self.client = Tollgate_V1_AuditService.Client(wrapping: client)
    self.grpcClient = client
    self.metadata = metadata
  }

  /// The gateway's consistency proof, for ``AuditLogVerifier/verifyLog(records:checkpointNote:consistencyProof:)``.
  public func consistencyProof(old: UInt64, new: UInt64) async throws -> [MerkleTree.Hash] {
    let request = Tollgate_V1_GetConsistencyProofRequest.with {
      $0.oldSize = old
      $0.newSize = new
    }
    let response = try await client.getConsistencyProof(request, metadata: metadata)
    return response.proof.hashes.map { Array($0) }
  }

  /// The hashes of the gateway's inclusion proof, for ``AuditLogVerifier/verifyRange(from:records:checkpointNote:edgeProof:consistencyProof:)``.
  public func inclusionProof(index: UInt64, treeSize: UInt64) async throws -> [MerkleTree.Hash] {
    let request = Tollgate_V1_GetInclusionProofRequest.with {
      $0.index = index
      $0.treeSize = treeSize
    }
    return try await client.getInclusionProof(request, metadata: metadata).hashes.map { Array($0) }
  }

  public func checkpoint() async throws -> Tollgate_V1_Checkpoint {
    try await client.getCheckpoint(Tollgate_V1_GetCheckpointRequest(), metadata: metadata).checkpoint
  }

  /// Streams records one by one to `handle` (checkpoint messages are skipped) until the stream
  /// ends or `handle` returns false.
  public func records(
    _ request: Tollgate_V1_StreamEventsRequest,
    options: CallOptions = .defaults,
    _ handle: @escaping @Sendable (Tollgate_V1_AuditRecord) async throws -> Bool
  ) async throws {
    try await stream(request, options: options) { message in
      guard case .records(let batch) = message.item else { return true }
      for record in batch.records where try await !handle(record) { return false }
      return true
    }
  }

  /// Streams every message (record batches, checkpoints, proofs) to `handle` until the stream
  /// ends or `handle` returns false.
  public func stream(
    _ request: Tollgate_V1_StreamEventsRequest,
    options: CallOptions = .defaults,
    _ handle: @escaping @Sendable (Tollgate_V1_StreamEventsResponse) async throws -> Bool
  ) async throws {
    try await client.streamEvents(request, metadata: metadata, options: options) { response in
      for try await message in response.messages {
        if try await !handle(message) { return }
      }
    }
  }
}

/// A StreamEvents message as a verifier needs it: each record's index and exact leaf bytes, read
/// straight off the wire without decoding the events (the bulk of the work for a long log).
public enum AuditStreamMessage: Sendable {
  case leaves([(index: UInt64, leaf: [UInt8])])
  case other(Tollgate_V1_StreamEventsResponse)
}

/// Reads `records` batches field by field (index and leaf only); anything else is decoded whole.
public struct AuditLeafDeserializer: MessageDeserializer {
  public init() {}

  public struct Malformed: Error, CustomStringConvertible {
    public let description: String
  }

  public func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> AuditStreamMessage {
    let leaves = try bytes.withUnsafeBytes { buffer -> [(index: UInt64, leaf: [UInt8])]? in
      var reader = WireReader(buffer)
      // A records batch is the message's only field when present (oneof).
      guard let (field, type) = try reader.tag(), field == 4, type == 2 else { return nil }
      var batch = WireReader(try reader.lengthDelimited())
      guard reader.isAtEnd else { return nil }
      var out: [(index: UInt64, leaf: [UInt8])] = []
      while let (field, type) = try batch.tag() {
        guard field == 1, type == 2 else { try batch.skip(type); continue }
        var record = WireReader(try batch.lengthDelimited())
        var index: UInt64 = 0
        var leaf: [UInt8] = []
        while let (field, type) = try record.tag() {
          switch (field, type) {
          case (1, 0): index = try record.varint()
          case (2, 2): leaf = Array(try record.lengthDelimited())
          default: try record.skip(type)
          }
        }
        out.append((index, leaf))
      }
      return out
    }
    if let leaves { return .leaves(leaves) }
    return .other(try ProtobufDeserializer<Tollgate_V1_StreamEventsResponse>().deserialize(bytes))
  }
}

/// Just enough of the protobuf wire format to walk fields.
struct WireReader {
  var bytes: UnsafeRawBufferPointer.SubSequence
  init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes[...] }
  init(_ bytes: UnsafeRawBufferPointer.SubSequence) { self.bytes = bytes }

  var isAtEnd: Bool { bytes.isEmpty }

  mutating func varint() throws -> UInt64 {
    var value: UInt64 = 0
    var shift: UInt64 = 0
    while let byte = bytes.first {
      bytes = bytes.dropFirst()
      value |= UInt64(byte & 0x7F) << shift
      if byte & 0x80 == 0 { return value }
      shift += 7
      if shift > 63 { break }
    }
    throw AuditLeafDeserializer.Malformed(description: "bad varint")
  }

  mutating func tag() throws -> (UInt64, UInt64)? {
    if bytes.isEmpty { return nil }
    let key = try varint()
    return (key >> 3, key & 7)
  }

  mutating func lengthDelimited() throws -> UnsafeRawBufferPointer.SubSequence {
    let length = Int(try varint())
    guard length <= bytes.count else { throw AuditLeafDeserializer.Malformed(description: "truncated field") }
    defer { bytes = bytes.dropFirst(length) }
    return bytes.prefix(length)
  }

  mutating func skip(_ type: UInt64) throws {
    switch type {
    case 0: _ = try varint()
    case 1: guard bytes.count >= 8 else { throw AuditLeafDeserializer.Malformed(description: "truncated") }; bytes = bytes.dropFirst(8)
    case 2: _ = try lengthDelimited()
    case 5: guard bytes.count >= 4 else { throw AuditLeafDeserializer.Malformed(description: "truncated") }; bytes = bytes.dropFirst(4)
    default: throw AuditLeafDeserializer.Malformed(description: "unsupported wire type \(type)")
    }
  }
}

extension AuditReader {
  /// Streams records as (index, exact leaf bytes), without decoding events, until the stream
  /// ends or `handle` returns false. What exports and verifiers need, at the speed of the wire.
  public func leaves(
    _ request: Tollgate_V1_StreamEventsRequest,
    options: CallOptions = .defaults,
    _ handle: @escaping @Sendable ([(index: UInt64, leaf: [UInt8])]) async throws -> Bool
  ) async throws {
    try await grpcClient.serverStreaming(
      request: ClientRequest(message: request, metadata: metadata),
      descriptor: Tollgate_V1_AuditService.Method.StreamEvents.descriptor,
      serializer: ProtobufSerializer<Tollgate_V1_StreamEventsRequest>(),
      deserializer: AuditLeafDeserializer(),
      options: options
    ) { response in
      for try await message in response.messages {
        guard case .leaves(let batch) = message else { continue }
        if try await !handle(batch) { return }
      }
    }
  }
}
