/// A perfect subtree of an RFC 6962 tree: the node at `level` covering leaves
/// `[index << level, (index + 1) << level)`. Level 0 nodes are leaf hashes.
public struct NodeAddress: Hashable, Sendable {
  public var level: Int
  public var index: UInt64

  public init(level: Int, index: UInt64) {
    self.level = level
    self.index = index
  }
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest (leftmost) first,
/// one per set bit of `size`. Enough to append leaves and to compute the root, so an appender
/// needs neither the leaves nor the stored nodes.
public struct CompactRange: Sendable, Hashable {
  public private(set) var size: UInt64
  public private(set) var hashes: [MerkleTree.Hash]

  public init() {
    self.size = 0
    self.hashes = []
  }

  /// Restores a range read back from storage; nil if the hash count does not match `size`.
  public init?(size: UInt64, hashes: [MerkleTree.Hash]) {
    guard size.nonzeroBitCount == hashes.count, hashes.allSatisfy({ $0.count == 32 }) else { return nil }
    self.size = size
    self.hashes = hashes
  }

  /// The compact range of the first `index` leaves, read off an inclusion proof of leaf `index` in
  /// a tree of `treeSize` leaves; nil if the proof is not shaped like one. The proof's left
  /// siblings (RFC 9162 §2.1.3.2) are the perfect subtrees left of the leaf, one per set bit of
  /// `index`, lowest first. Nothing here checks them: leaves appended to a range of wrong hashes
  /// cannot re-hash to the signed root.
  public init?(leftOf index: UInt64, treeSize: UInt64, inclusionProof proof: [MerkleTree.Hash]) {
    var left: [MerkleTree.Hash] = []
    let walked = MerkleTree.walkInclusionProof(index: index, treeSize: treeSize, proof: proof) { p, isLeft in
      if isLeft { left.append(p) }
    }
    guard walked else { return nil }
    self.init(size: index, hashes: left.reversed())
  }

  /// Appends one leaf hash and returns every perfect subtree it completes, the leaf itself first.
  public mutating func append(leafHash: MerkleTree.Hash) -> [(NodeAddress, MerkleTree.Hash)] {
    var completed: [(NodeAddress, MerkleTree.Hash)] = []
    push(leafHash) { completed.append(($0, $1)) }
    return completed
  }

  /// Appends leaf hashes, for a verifier that needs only the resulting ``root``.
  public mutating func append(leafHashes: some Sequence<MerkleTree.Hash>) {
    for leafHash in leafHashes { push(leafHash) { _, _ in } }
  }

  /// Appends a leaf hash, passing `completed` every perfect subtree it completes, the leaf first.
  @inline(__always)
  private mutating func push(_ leafHash: MerkleTree.Hash, completed: (NodeAddress, MerkleTree.Hash) -> Void) {
    var node = leafHash
    var address = NodeAddress(level: 0, index: size)
    completed(address, node)
    // Each trailing one bit of the new leaf's index merges it with a left neighbour.
    while address.index & 1 == 1 {
      node = MerkleTree.nodeHash(hashes.removeLast(), node)
      address = NodeAddress(level: address.level + 1, index: address.index >> 1)
      completed(address, node)
    }
    hashes.append(node)
    size += 1
  }

  /// The RFC 6962 root of the tree of `size` leaves.
  public var root: MerkleTree.Hash {
    guard var root = hashes.last else { return MerkleTree.root([]) }
    for hash in hashes.dropLast().reversed() { root = MerkleTree.nodeHash(hash, root) }
    return root
  }
}

extension MerkleTree {
  /// Proofs computed from stored perfect-subtree hashes instead of all leaves: every hash in an
  /// RFC 6962 proof is the hash of a range `[lo, hi)` whose left part splits into perfect
  /// subtrees, so O(log² n) stored nodes answer any proof of a tree of n leaves.
  ///
  /// `node` must return the stored hash of a perfect subtree. ``nodesNeeded(_:)`` lists the
  /// addresses a proof will ask for, so a store can fetch them in one query first.
  public static func rangeHash(_ lo: UInt64, _ hi: UInt64, node: (NodeAddress) -> Hash) -> Hash {
    let n = hi - lo
    precondition(n > 0, "empty range")
    if n & (n - 1) == 0 && lo % n == 0 {
      return node(NodeAddress(level: n.trailingZeroBitCount, index: lo / n))
    }
    let k = UInt64(largestPowerOfTwo(below: Int(n)))
    return nodeHash(rangeHash(lo, lo + k, node: node), rangeHash(lo + k, hi, node: node))
  }

  /// The root of the first `treeSize` leaves from stored nodes.
  public static func root(treeSize: UInt64, node: (NodeAddress) -> Hash) -> Hash {
    treeSize == 0 ? root([]) : rangeHash(0, treeSize, node: node)
  }

  /// RFC 6962 PATH(index, D[0:treeSize]) from stored nodes.
  public static func inclusionProof(index: UInt64, treeSize: UInt64, node: (NodeAddress) -> Hash) -> [Hash] {
    precondition(index < treeSize, "index out of range")
    func path(_ m: UInt64, _ lo: UInt64, _ hi: UInt64) -> [Hash] {
      let n = hi - lo
      if n == 1 { return [] }
      let k = UInt64(largestPowerOfTwo(below: Int(n)))
      if m < lo + k { return path(m, lo, lo + k) + [rangeHash(lo + k, hi, node: node)] }
      return path(m, lo + k, hi) + [rangeHash(lo, lo + k, node: node)]
    }
    return path(index, 0, treeSize)
  }

  /// RFC 6962 PROOF(oldSize, D[0:newSize]) from stored nodes.
  public static func consistencyProof(oldSize: UInt64, newSize: UInt64, node: (NodeAddress) -> Hash) -> [Hash] {
    precondition(oldSize <= newSize, "old size beyond new size")
    if oldSize == 0 || oldSize == newSize { return [] }
    func subproof(_ m: UInt64, _ lo: UInt64, _ hi: UInt64, _ complete: Bool) -> [Hash] {
      let n = hi - lo
      if m == n { return complete ? [] : [rangeHash(lo, hi, node: node)] }
      let k = UInt64(largestPowerOfTwo(below: Int(n)))
      if m <= k { return subproof(m, lo, lo + k, complete) + [rangeHash(lo + k, hi, node: node)] }
      return subproof(m - k, lo + k, hi, false) + [rangeHash(lo, lo + k, node: node)]
    }
    return subproof(oldSize, 0, newSize, true)
  }

  /// The stored nodes `compute` will read, found by running it once without hashing real data
  /// (the shape of a proof depends only on sizes and indices, never on hash values).
  public static func nodesNeeded<Result>(_ compute: ((NodeAddress) -> Hash) -> Result) -> Set<NodeAddress> {
    var needed = Set<NodeAddress>()
    let placeholder = Hash(repeating: 0, count: 32)
    _ = compute { address in
      needed.insert(address)
      return placeholder
    }
    return needed
  }
}

/// Which perfect subtrees a store keeps, and how any other one is hashed from those and leaves.
///
/// A store keeps the nodes of every level that is a positive multiple of `stride` (with the
/// default 8: the root of every complete 256-leaf tile, of every 65,536-leaf tile, …), about one
/// row per 255 leaves instead of two per leaf. A node of any other level is hashed from at most
/// `2^(stride-1)` nodes of the kept level below it, or from leaves below the first kept level, so
/// a proof of O(log n) hashes reads at most a few hundred leaves and kept nodes.
public struct StoredLevels: Sendable, Hashable {
  public let stride: Int

  public static let standard = StoredLevels(stride: 8)

  public init(stride: Int) {
    precondition(stride >= 1 && stride < 64, "stride out of range")
    self.stride = stride
  }

  /// True when a store keeps the nodes of `level` (level 0, the leaf hashes, never: the leaves are
  /// there).
  public func keeps(level: Int) -> Bool { level > 0 && level % stride == 0 }

  /// What hashing `addresses` reads: kept nodes, and leaves by index.
  public func inputs(for addresses: Set<NodeAddress>) -> (nodes: Set<NodeAddress>, leaves: Set<UInt64>) {
    var nodes = Set<NodeAddress>()
    var leaves = Set<UInt64>()
    for address in addresses {
      if keeps(level: address.level) {
        nodes.insert(address)
        continue
      }
      let base = address.level - address.level % stride
      let shift = UInt64(address.level - base)
      let first = address.index << shift
      let below = (address.index + 1) << shift
      if base == 0 {
        leaves.formUnion(first..<below)
      } else {
        for index in first..<below { nodes.insert(NodeAddress(level: base, index: index)) }
      }
    }
    return (nodes, leaves)
  }

  /// The hash of the perfect subtree at `address`, from the kept nodes and leaf hashes that
  /// ``inputs(for:)`` listed for it.
  public func hash(
    _ address: NodeAddress,
    node: (NodeAddress) -> MerkleTree.Hash,
    leafHash: (UInt64) -> MerkleTree.Hash
  ) -> MerkleTree.Hash {
    if keeps(level: address.level) { return node(address) }
    if address.level == 0 { return leafHash(address.index) }
    let left = NodeAddress(level: address.level - 1, index: address.index << 1)
    let right = NodeAddress(level: address.level - 1, index: (address.index << 1) | 1)
    return MerkleTree.nodeHash(hash(left, node: node, leafHash: leafHash), hash(right, node: node, leafHash: leafHash))
  }
}
