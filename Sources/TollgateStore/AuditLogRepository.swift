public import Foundation
public import Logging
public import NIOCore
import PostgresNIO
import Synchronization
public import TollgateMerkle
public import TollgateModel

/// One audit event ready to append: the exact leaf bytes and the columns copied out of it for
/// filtering.
public struct AuditEntry: Sendable {
  public var log: AuditLogID
  public var leaf: ByteBuffer
  public var time: Date
  public var method: String
  public var principal: String
  public var outcome: Int32

  public init(log: AuditLogID, leaf: ByteBuffer, time: Date, method: String, principal: String, outcome: Int32) {
    self.log = log
    self.leaf = leaf
    self.time = time
    self.method = method
    self.principal = principal
    self.outcome = outcome
  }
}

/// Which records of a log a reader wants; empty fields match everything.
public struct AuditFilter: Sendable {
  public var from: Date?
  public var until: Date?
  public var methods: [String] = []
  public var principal: String?
  public var outcomes: [Int32] = []

  public init(from: Date? = nil, until: Date? = nil, methods: [String] = [], principal: String? = nil, outcomes: [Int32] = []) {
    self.from = from
    self.until = until
    self.methods = methods
    self.principal = principal
    self.outcomes = outcomes
  }

  /// True when the filter lets every record through.
  public var isEmpty: Bool { from == nil && until == nil && methods.isEmpty && principal == nil && outcomes.isEmpty }
}

/// What an appender's transaction tried to append to each log, kept until the appender knows it
/// committed (``settled()``).
///
/// A transaction whose COMMIT went unanswered (the database slower than the operation timeout, or
/// the connection lost) may have committed all the same. An appender that then appends the same
/// events again, as the audit flusher retries its batch, would record them twice. Given the
/// attempt, the retry looks at the index where the unanswered try began and leaves out the events
/// found there.
public final class AuditAppendAttempt: Sendable {
  struct Tried: Sendable {
    /// Where the try began: the log's size when its transaction locked the head.
    let first: UInt64
    let count: Int
    let firstLeafHash: MerkleTree.Hash
  }
  private let tried = Mutex<[AuditLogID: Tried]>([:])

  public init() {}

  /// The appends recorded are known to have committed or failed: nothing is left to look for.
  public func settled() { tried.withLock { $0 = [:] } }

  func record(_ log: AuditLogID, first: UInt64, count: Int, firstLeafHash: MerkleTree.Hash) {
    tried.withLock { $0[log] = Tried(first: first, count: count, firstLeafHash: firstLeafHash) }
  }

  func previous(_ log: AuditLogID) -> Tried? { tried.withLock { $0[log] } }
}

/// A signed checkpoint as stored.
public struct StoredCheckpoint: Sendable, Hashable {
  public var log: AuditLogID
  public var treeSize: UInt64
  public var rootHash: [UInt8]
  public var keyName: String
  public var publicKey: [UInt8]
  public var signedNote: String
  public var createTime: Date

  public init(
    log: AuditLogID,
    treeSize: UInt64,
    rootHash: [UInt8],
    keyName: String,
    publicKey: [UInt8],
    signedNote: String,
    createTime: Date
  ) {
    self.log = log
    self.treeSize = treeSize
    self.rootHash = rootHash
    self.keyName = keyName
    self.publicKey = publicKey
    self.signedNote = signedNote
    self.createTime = createTime
  }
}

/// The per-log Merkle trees of the audit trail: appends, records, stored nodes and checkpoints.
///
/// An append locks its log's row in `audit_logs`, reads the size and compact range, writes the
/// leaves (each with its leaf hash) and the kept subtrees they complete (``storedLevels``), and
/// advances the row, all in the caller's transaction. Appends to one log are therefore
/// serialised across every replica and commit in index order: a reader never sees index n+1
/// without n, and a rolled-back append gives its indices back. Each append notifies
/// `tollgate_audit` with the log's key, delivered on commit.
public struct AuditLogRepository: Sendable {
  public static let channel = "tollgate_audit"
  /// The tree levels whose nodes `audit_nodes` keeps; leaf hashes live in their leaf rows, and
  /// every other node is hashed when a proof needs it (``subtreeHashes(_:_:logger:)``). Rows of
  /// other levels written before migration 8 are never read, but for level 0 of older leaves.
  public static let storedLevels = StoredLevels.standard

  let database: Database

  public init(database: Database) {
    self.database = database
  }

  /// Appends `entries` in the transaction of `connection`; returns each log's new index range.
  /// Logs are locked in key order, so two appenders of overlapping logs cannot deadlock. With an
  /// `attempt`, events an earlier, unanswered try already committed are left out, and what this
  /// try appends is recorded in it.
  @discardableResult
  static func append(
    _ entries: [AuditEntry],
    attempt: AuditAppendAttempt? = nil,
    on connection: PostgresConnection,
    logger: Logger
  ) async throws -> [AuditLogID: Range<UInt64>] {
    var byLog: [AuditLogID: [AuditEntry]] = [:]
    for entry in entries { byLog[entry.log, default: []].append(entry) }
    var appended: [AuditLogID: Range<UInt64>] = [:]
    for log in byLog.keys.sorted() {
      let range = try await lockHead(log, on: connection, logger: logger)
      var batch = byLog[log]!
      if let attempt {
        batch = try await uncommitted(batch, of: log, head: range.size, attempt: attempt, on: connection, logger: logger)
        guard !batch.isEmpty else { continue }
      }
      appended[log] = try await append(batch, to: log, at: range, on: connection, logger: logger)
    }
    return appended
  }

  /// `batch` less the events at its front that `attempt`'s previous try committed to `log`
  /// (its first event's leaf hash is stored where that try began), recording this try in
  /// `attempt`. The retried batch holds the earlier try's events first, in order; any other
  /// appender's events at that index hash differently, and then nothing is left out.
  static func uncommitted(
    _ batch: [AuditEntry],
    of log: AuditLogID,
    head size: UInt64,
    attempt: AuditAppendAttempt,
    on connection: PostgresConnection,
    logger: Logger
  ) async throws -> [AuditEntry] {
    var batch = batch
    if let tried = attempt.previous(log), tried.count <= batch.count, size >= tried.first + UInt64(tried.count),
      MerkleTree.leafHash(batch[0].leaf.readableBytesView) == tried.firstLeafHash
    {
      let rows = try await connection.prepared(
        "SELECT leaf_hash FROM audit_leaves WHERE tenant_id = \(log.rawValue) AND leaf_index = \(Int64(tried.first))",
        logger: logger
      )
      var stored: ByteBuffer?
      for try await hash in rows.decode(ByteBuffer?.self) { stored = hash }
      if let stored, Array(stored.readableBytesView) == tried.firstLeafHash {
        logger.warning(
          "audit events whose commit went unanswered were committed; not appending them again",
          metadata: ["log": "\(log.rawValue)", "events": "\(tried.count)", "first_index": "\(tried.first)"]
        )
        batch.removeFirst(tried.count)
      }
    }
    if let first = batch.first {
      attempt.record(log, first: size, count: batch.count, firstLeafHash: MerkleTree.leafHash(first.leaf.readableBytesView))
    }
    return batch
  }

  /// Takes `log`'s head row lock until the transaction ends (creating the log on first use) and
  /// returns its committed size and compact range, in one round trip.
  static func lockHead(_ log: AuditLogID, on connection: PostgresConnection, logger: Logger) async throws -> CompactRange {
    let rows = try await connection.prepared(
      """
      INSERT INTO audit_logs AS l (tenant_id) VALUES (\(log.rawValue))
      ON CONFLICT (tenant_id) DO UPDATE SET size = l.size
      RETURNING size, compact_range
      """,
      logger: logger
    )
    guard let range = try await head(of: log, in: rows) else {
      throw StoreError.unexpected("audit log \(log.rawValue) has a corrupt compact range")
    }
    return range
  }

  /// The head of `log` in `rows` (`size, compact_range`), nil if there is no row.
  static func head(of log: AuditLogID, in rows: some AsyncSequence<PostgresRow, any Error>) async throws -> CompactRange? {
    var head: CompactRange?
    for try await (size, bytes) in rows.decode((Int64, ByteBuffer).self) {
      guard let range = compactRange(size: size, bytes: bytes) else {
        throw StoreError.unexpected("audit log \(log.rawValue) has a corrupt compact range")
      }
      head = range
    }
    return head
  }

  /// Appends `batch` to `log`, whose head the transaction has locked and found at `range`.
  @discardableResult
  static func append(
    _ batch: [AuditEntry],
    to log: AuditLogID,
    at range: CompactRange,
    on connection: PostgresConnection,
    logger: Logger
  ) async throws -> Range<UInt64> {
    let storedLevels = Self.storedLevels
    var range = range
    let first = range.size
    var levels: [Int16] = []
    var nodeIndices: [Int64] = []
    var hashes: [ByteBuffer] = []
    // About one kept node per 255 leaves; a batch completes at most a few.
    levels.reserveCapacity(4)
    nodeIndices.reserveCapacity(4)
    hashes.reserveCapacity(4)
    var leafHashes: [ByteBuffer] = []
    leafHashes.reserveCapacity(batch.count)
    for entry in batch {
      let leafHash = MerkleTree.leafHash(entry.leaf.readableBytesView)
      leafHashes.append(ByteBuffer(bytes: leafHash))
      for (address, hash) in range.append(leafHash: leafHash) where storedLevels.keeps(level: address.level) {
        levels.append(Int16(address.level))
        nodeIndices.append(Int64(address.index))
        hashes.append(ByteBuffer(bytes: hash))
      }
    }
    let indices = (0..<batch.count).map { Int64(first) + Int64($0) }
    var rangeOut = ByteBuffer()
    for hash in range.hashes { rangeOut.writeBytes(hash) }
    // Leaves, nodes, the new head and the wake-up for followers in one statement.
    try await connection.prepared(
      """
      WITH leaves AS (
        INSERT INTO audit_leaves (tenant_id, leaf_index, leaf, leaf_hash, event_time, method, principal, outcome)
        SELECT \(log.rawValue), * FROM unnest(
          \(indices)::bigint[], \(batch.map(\.leaf))::bytea[], \(leafHashes)::bytea[], \(batch.map(\.time))::timestamptz[],
          \(batch.map(\.method))::text[], \(batch.map(\.principal))::text[], \(batch.map(\.outcome))::integer[])
      ), nodes AS (
        INSERT INTO audit_nodes (tenant_id, level, node_index, hash)
        SELECT \(log.rawValue), * FROM unnest(\(levels)::smallint[], \(nodeIndices)::bigint[], \(hashes)::bytea[])
      ), head AS (
        UPDATE audit_logs SET size = \(Int64(range.size)), compact_range = \(rangeOut)
        WHERE tenant_id = \(log.rawValue)
      )
      SELECT pg_notify(\(channel), \(log.rawValue))
      """,
      logger: logger
    )
    return first..<range.size
  }

  static func compactRange(size: Int64, bytes: ByteBuffer) -> CompactRange? {
    guard size >= 0, bytes.readableBytes % 32 == 0 else { return nil }
    var bytes = bytes
    var hashes: [MerkleTree.Hash] = []
    while let hash = bytes.readBytes(length: 32) { hashes.append(hash) }
    return CompactRange(size: UInt64(size), hashes: hashes)
  }

  /// Commits `entries` with the caller's transaction. Runs as the last statements of the
  /// transaction, with platform rights: the events' logs need not be the tenant the transaction is
  /// scoped to (an operator's platform-log event for a change to one tenant), and nothing
  /// tenant-scoped runs after them.
  ///
  /// An event is appended at once if its log's head row is free; if another transaction holds it,
  /// the event goes to `audit_pending` instead, to be given its index by
  /// ``sequencePending(only:limit:logger:)`` once committed. An append holds the head until
  /// commit, so waiting for it would let one tenant commit only one mutation at a time; trying it
  /// first keeps a lone mutation's event indexed in its own transaction, with no pass to follow.
  /// Heads are only ever tried here (`SKIP LOCKED`), never waited for, so this cannot deadlock.
  static func recordWithPlatformRights(_ entries: [AuditEntry], on connection: PostgresConnection, logger: Logger) async throws {
    guard !entries.isEmpty else { return }
    try await connection.prepared("SELECT set_config('role', \(Database.platformRole), true)", logger: logger)
    var byLog: [AuditLogID: [AuditEntry]] = [:]
    for entry in entries { byLog[entry.log, default: []].append(entry) }
    for log in byLog.keys.sorted() {
      let batch = byLog[log]!
      // Tries the head and, only if that finds no row, commits the events as pending, in one
      // statement: most tries under load find the head busy, and then need no second round trip.
      let rows = try await connection.prepared(
        """
        WITH head AS (
          SELECT size, compact_range FROM audit_logs WHERE tenant_id = \(log.rawValue) FOR UPDATE SKIP LOCKED
        ), pending AS (
          INSERT INTO audit_pending (tenant_id, leaf, event_time, method, principal, outcome)
          SELECT \(log.rawValue), * FROM unnest(
            \(batch.map(\.leaf))::bytea[], \(batch.map(\.time))::timestamptz[],
            \(batch.map(\.method))::text[], \(batch.map(\.principal))::text[], \(batch.map(\.outcome))::integer[])
          WHERE NOT EXISTS (SELECT 1 FROM head)
        )
        SELECT size, compact_range FROM head
        """,
        logger: logger
      )
      if let head = try await head(of: log, in: rows) {
        try await append(batch, to: log, at: head, on: connection, logger: logger)
      } else {
        // Busy, or the log's first event (the sequencer creates the log).
        TransactionMarks.current?.markAuditQueued()
      }
    }
  }

  /// Moves committed pending events into their logs, oldest first, in one transaction: of `log`
  /// only if given, else of every log; at most `limit` per log. Returns how many it moved.
  ///
  /// Each log's head row is locked before its pending rows are read and deleted, so two
  /// sequencers (of two replicas, or a reader's catch-up beside the background pass) never take
  /// the same rows, and heads are locked in key order, so they cannot deadlock.
  @discardableResult
  public func sequencePending(only log: AuditLogID? = nil, limit: Int = 10_000, logger: Logger) async throws(StoreError) -> Int {
    try await database.withPlatform(logger: logger) { connection in
      var logs: [AuditLogID]
      if let log {
        // Readers catch up before every read; most find nothing, and must not pay a head lock.
        let rows = try await connection.prepared(
          "SELECT EXISTS (SELECT 1 FROM audit_pending WHERE tenant_id = \(log.rawValue))", logger: logger)
        var any = false
        for try await exists in rows.decode(Bool.self) { any = exists }
        logs = any ? [log] : []
      } else {
        logs = []
        let rows = try await connection.prepared("SELECT DISTINCT tenant_id FROM audit_pending", logger: logger)
        for try await key in rows.decode(String.self) {
          // Only this code writes the table; a key it cannot read was put there by hand, and must
          // not stop every other log's events from being indexed.
          guard let log = AuditLogID(rawValue: key) else {
            logger.error("pending audit events name an unknown log; leaving them", metadata: ["log": "\(key)"])
            continue
          }
          logs.append(log)
        }
      }
      var moved = 0
      for log in logs.sorted() {
        let range = try await Self.lockHead(log, on: connection, logger: logger)
        let rows = try await connection.prepared(
          """
          WITH taken AS (
            DELETE FROM audit_pending WHERE seq IN (
              SELECT seq FROM audit_pending WHERE tenant_id = \(log.rawValue) ORDER BY seq LIMIT \(limit))
            RETURNING seq, leaf, event_time, method, principal, outcome
          )
          SELECT leaf, event_time, method, principal, outcome FROM taken ORDER BY seq
          """,
          logger: logger
        )
        var batch: [AuditEntry] = []
        for try await (leaf, time, method, principal, outcome) in rows.decode((ByteBuffer, Date, String, String, Int32).self) {
          batch.append(AuditEntry(log: log, leaf: leaf, time: time, method: method, principal: principal, outcome: outcome))
        }
        guard !batch.isEmpty else { continue }
        try await Self.append(batch, to: log, at: range, on: connection, logger: logger)
        moved += batch.count
      }
      return moved
    }
  }

  /// Appends `entries` (of any logs) in a transaction of their own, committed on return. An
  /// appender that retries failed appends passes the same `attempt` to each retry, and settles it
  /// once one has committed, so that events of a try that committed unanswered are not recorded
  /// twice.
  @discardableResult
  public func append(
    _ entries: [AuditEntry],
    attempt: AuditAppendAttempt? = nil,
    logger: Logger
  ) async throws(StoreError) -> [AuditLogID: Range<UInt64>] {
    guard !entries.isEmpty else { return [:] }
    return try await database.withPlatform(logger: logger) { connection in
      try await Self.append(entries, attempt: attempt, on: connection, logger: logger)
    }
  }

  /// Runs `body` in the scope that may read `log`: its tenant's, or platform-wide.
  func reading<Result: Sendable>(
    _ log: AuditLogID,
    logger: Logger,
    _ body: @escaping @Sendable (PostgresConnection) async throws -> Result
  ) async throws(StoreError) -> Result {
    switch log {
    case .tenant(let id): return try await database.withTenant(id, logger: logger, body)
    case .platform: return try await database.withPlatform(logger: logger, body)
    }
  }

  /// The committed size and compact range of `log` (empty if it has no events yet).
  public func head(_ log: AuditLogID, logger: Logger) async throws(StoreError) -> CompactRange {
    try await reading(log, logger: logger) { connection in
      let rows = try await connection.prepared(
        "SELECT size, compact_range FROM audit_logs WHERE tenant_id = \(log.rawValue)",
        logger: logger
      )
      return try await Self.head(of: log, in: rows) ?? CompactRange()
    }
  }

  /// The records of `log` with indices in `[from, below)` that match `filter`, in index order.
  /// Indices are unique, so there are at most `below - from`; callers keep that window small.
  public func records(
    _ log: AuditLogID,
    from: UInt64,
    below: UInt64,
    filter: AuditFilter,
    logger: Logger
  ) async throws(StoreError) -> [(index: UInt64, leaf: ByteBuffer)] {
    try await reading(log, logger: logger) { connection in
      // The window comes back as one value, each record framed as index (8 bytes), length (4) and
      // leaf, not as a row per record: PostgresNIO's per-row work (a message, an async step and a
      // generic decode each) bounded exports at about 430,000 records/s, well under what the
      // database sends. Unfiltered reads (exports, verification, followers) get a statement of
      // their own: the prepared statement's generic plan cannot fold the filter's `IS NULL` tests
      // away, and would evaluate all five for every row of a million-record export.
      let rows = try await filter.isEmpty
        ? connection.prepared(
          """
          SELECT string_agg(int8send(leaf_index) || int4send(length(leaf)) || leaf, ''::bytea) FROM (
            SELECT leaf_index, leaf FROM audit_leaves
            WHERE tenant_id = \(log.rawValue) AND leaf_index >= \(Int64(from)) AND leaf_index < \(Int64(below))
            ORDER BY leaf_index
          ) AS window_records
          """,
          logger: logger
        )
        : connection.prepared(
          """
          SELECT string_agg(int8send(leaf_index) || int4send(length(leaf)) || leaf, ''::bytea) FROM (
            SELECT leaf_index, leaf FROM audit_leaves
            WHERE tenant_id = \(log.rawValue) AND leaf_index >= \(Int64(from)) AND leaf_index < \(Int64(below))
              AND (\(filter.from)::timestamptz IS NULL OR event_time >= \(filter.from))
              AND (\(filter.until)::timestamptz IS NULL OR event_time < \(filter.until))
              AND (cardinality(\(filter.methods)::text[]) = 0 OR method = ANY(\(filter.methods)))
              AND (\(filter.principal)::text IS NULL OR principal = \(filter.principal))
              AND (cardinality(\(filter.outcomes)::integer[]) = 0 OR outcome = ANY(\(filter.outcomes)))
            ORDER BY leaf_index
          ) AS window_records
          """,
          logger: logger
        )
      var framed: ByteBuffer?
      for try await blob in rows.decode(ByteBuffer?.self) { framed = blob }
      return try Self.unframe(framed, from: from, below: below)
    }
  }

  /// The records of a window read by ``records(_:from:below:filter:logger:)``, each a slice of
  /// the one buffer. An aggregate over an ordered subquery keeps its order in practice but
  /// PostgreSQL does not promise it, so the order is checked, and restored if need be.
  static func unframe(_ framed: ByteBuffer?, from: UInt64, below: UInt64) throws -> [(index: UInt64, leaf: ByteBuffer)] {
    guard var framed else { return [] }
    var out: [(index: UInt64, leaf: ByteBuffer)] = []
    out.reserveCapacity(Int(below - min(from, below)))
    var ordered = true
    while framed.readableBytes > 0 {
      guard let index = framed.readInteger(as: Int64.self), let length = framed.readInteger(as: Int32.self), length >= 0,
        let leaf = framed.readSlice(length: Int(length)), index >= 0
      else {
        throw StoreError.damaged("a window of audit records read back malformed")
      }
      if let last = out.last, last.index >= UInt64(index) { ordered = false }
      out.append((UInt64(index), leaf))
    }
    if !ordered { out.sort { $0.index < $1.index } }
    return out
  }

  /// The stored leaf at `index`, if present.
  public func leaf(_ log: AuditLogID, index: UInt64, logger: Logger) async throws(StoreError) -> ByteBuffer? {
    try await reading(log, logger: logger) { connection in
      let rows = try await connection.prepared(
        "SELECT leaf FROM audit_leaves WHERE tenant_id = \(log.rawValue) AND leaf_index = \(Int64(index))",
        logger: logger
      )
      for try await leaf in rows.decode(ByteBuffer.self) { return leaf }
      return nil
    }
  }

  /// The hashes of the perfect subtrees at `addresses`, from the kept nodes and the leaves below
  /// them, read in one transaction; fails if any of those is missing (a damaged store).
  public func subtreeHashes(
    _ log: AuditLogID,
    _ addresses: Set<NodeAddress>,
    logger: Logger
  ) async throws(StoreError) -> [NodeAddress: MerkleTree.Hash] {
    guard !addresses.isEmpty else { return [:] }
    let levels = Self.storedLevels
    let (wantedNodes, wantedLeaves) = levels.inputs(for: addresses)
    let (nodes, leafHashes) = try await reading(log, logger: logger) { connection in
      var nodes: [NodeAddress: MerkleTree.Hash] = [:]
      if !wantedNodes.isEmpty {
        let wanted = Array(wantedNodes)
        let rows = try await connection.prepared(
          """
          SELECT n.level, n.node_index, n.hash FROM audit_nodes n
          JOIN unnest(\(wanted.map { Int16($0.level) })::smallint[], \(wanted.map { Int64($0.index) })::bigint[])
            AS w(level, node_index) ON n.level = w.level AND n.node_index = w.node_index
          WHERE n.tenant_id = \(log.rawValue)
          """,
          logger: logger
        )
        for try await (level, index, hash) in rows.decode((Int16, Int64, ByteBuffer).self) {
          nodes[NodeAddress(level: Int(level), index: UInt64(index))] = Array(hash.readableBytesView)
        }
      }
      var leafHashes: [UInt64: MerkleTree.Hash] = [:]
      if !wantedLeaves.isEmpty {
        // The hashes recorded at append time, never the leaf bytes rehashed: a leaf altered in
        // place must not change the proofs, or a verifier could not locate it with them. Leaves
        // from before migration 8 have theirs in audit_nodes' level 0.
        let rows = try await connection.prepared(
          """
          SELECT l.leaf_index, coalesce(l.leaf_hash, n.hash) FROM audit_leaves l
          LEFT JOIN audit_nodes n ON l.leaf_hash IS NULL
            AND n.tenant_id = l.tenant_id AND n.level = 0 AND n.node_index = l.leaf_index
          WHERE l.tenant_id = \(log.rawValue) AND l.leaf_index = ANY(\(wantedLeaves.map { Int64($0) })::bigint[])
          """,
          logger: logger
        )
        for try await (index, hash) in rows.decode((Int64, ByteBuffer?).self) {
          if let hash, hash.readableBytes == 32 { leafHashes[UInt64(index)] = Array(hash.readableBytesView) }
        }
      }
      return (nodes, leafHashes)
    }
    guard nodes.count == wantedNodes.count, leafHashes.count == wantedLeaves.count else {
      throw .damaged(
        "the audit log is missing \(wantedNodes.count - nodes.count) stored tree nodes and "
          + "\(wantedLeaves.count - leafHashes.count) records that this proof needs; verify the log to locate the damage"
      )
    }
    var out: [NodeAddress: MerkleTree.Hash] = [:]
    for address in addresses {
      out[address] = levels.hash(address, node: { nodes[$0]! }, leafHash: { leafHashes[$0]! })
    }
    return out
  }

  static let checkpointColumns = "tree_size, root_hash, key_name, public_key, signed_note, create_time"
  typealias CheckpointRow = (Int64, ByteBuffer, String, ByteBuffer, String, Date)

  static func decode(_ log: AuditLogID, _ row: CheckpointRow) -> StoredCheckpoint {
    StoredCheckpoint(
      log: log,
      treeSize: UInt64(row.0),
      rootHash: Array(row.1.readableBytesView),
      keyName: row.2,
      publicKey: Array(row.3.readableBytesView),
      signedNote: row.4,
      createTime: row.5
    )
  }

  /// The checkpoint of the largest tree size, or of exactly `treeSize` if given.
  public func checkpoint(_ log: AuditLogID, treeSize: UInt64? = nil, logger: Logger) async throws(StoreError)
    -> StoredCheckpoint?
  {
    return try await reading(log, logger: logger) { connection in
      // Two statements, not one with `$size IS NULL OR tree_size = $size`: as a prepared
      // statement's generic plan, that one would find an old size by walking the log's checkpoints
      // down from the newest.
      let rows =
        if let treeSize {
          try await connection.prepared(
            """
            SELECT \(unescaped: Self.checkpointColumns) FROM audit_checkpoints
            WHERE tenant_id = \(log.rawValue) AND tree_size = \(Int64(treeSize))
            """,
            logger: logger
          )
        } else {
          try await connection.prepared(
            """
            SELECT \(unescaped: Self.checkpointColumns) FROM audit_checkpoints
            WHERE tenant_id = \(log.rawValue) ORDER BY tree_size DESC LIMIT 1
            """,
            logger: logger
          )
        }
      for try await row in rows.decode(CheckpointRow.self) { return Self.decode(log, row) }
      return nil
    }
  }

  /// Stores a checkpoint; if one of that size exists already (another replica signed it first)
  /// that one is kept and returned.
  public func saveCheckpoint(_ checkpoint: StoredCheckpoint, logger: Logger) async throws(StoreError) -> StoredCheckpoint {
    let log = checkpoint.log
    return try await database.withPlatform(logger: logger) { connection in
      try await connection.query(
        """
        INSERT INTO audit_checkpoints (tenant_id, tree_size, root_hash, key_name, public_key, signed_note)
        VALUES (\(log.rawValue), \(Int64(checkpoint.treeSize)), \(ByteBuffer(bytes: checkpoint.rootHash)),
                \(checkpoint.keyName), \(ByteBuffer(bytes: checkpoint.publicKey)), \(checkpoint.signedNote))
        ON CONFLICT (tenant_id, tree_size) DO NOTHING
        """,
        logger: logger
      )
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.checkpointColumns) FROM audit_checkpoints
        WHERE tenant_id = \(log.rawValue) AND tree_size = \(Int64(checkpoint.treeSize))
        """,
        logger: logger
      )
      for try await row in rows.decode(CheckpointRow.self) { return Self.decode(log, row) }
      throw StoreError.unexpected("checkpoint vanished after insert")
    }
  }

  /// Every log that has grown past its latest checkpoint, with its current head.
  public func logsBehindCheckpoint(logger: Logger) async throws(StoreError) -> [(AuditLogID, CompactRange)] {
    try await database.withPlatform(logger: logger) { connection in
      let rows = try await connection.query(
        """
        SELECT l.tenant_id, l.size, l.compact_range FROM audit_logs l
        WHERE l.size > coalesce(
          (SELECT max(c.tree_size) FROM audit_checkpoints c WHERE c.tenant_id = l.tenant_id), 0)
        """,
        logger: logger
      )
      var out: [(AuditLogID, CompactRange)] = []
      for try await (key, size, bytes) in rows.decode((String, Int64, ByteBuffer).self) {
        guard let log = AuditLogID(rawValue: key), let range = Self.compactRange(size: size, bytes: bytes) else {
          logger.error("audit log row is corrupt; not checkpointing it", metadata: ["log": "\(key)"])
          continue
        }
        out.append((log, range))
      }
      return out
    }
  }
}
