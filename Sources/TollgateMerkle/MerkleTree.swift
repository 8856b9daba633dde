import Crypto

/// RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.
///
/// Leaf hash `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || left || right)`, and the tree
/// shape of RFC 6962 §2.1 (split at the largest power of two below the size). The proof builders
/// work on an in-memory list of leaf hashes (what a verifier that holds a full export has); the
/// verifiers need only the proof, so a client can check the gateway without trusting it.
public enum MerkleTree {
  public typealias Hash = [UInt8]

  /// `SHA-256(0x00 || leaf)`.
  public static func leafHash(_ leaf: some Sequence<UInt8>) -> Hash {
    var hasher = SHA256()
    hasher.update(data: [0x00])
    // In place where the bytes are contiguous (a stored leaf's ByteBuffer view is): every audited
    // call's leaf is hashed once when appended, and a verifier hashes every leaf of an export.
    let hashedInPlace = leaf.withContiguousStorageIfAvailable { hasher.update(bufferPointer: UnsafeRawBufferPointer($0)) }
    if hashedInPlace == nil { hasher.update(data: Array(leaf)) }
    return bytes(of: hasher.finalize())
  }

  /// `SHA-256(0x01 || left || right)`.
  public static func nodeHash(_ left: Hash, _ right: Hash) -> Hash {
    var hasher = SHA256()
    hasher.update(data: [0x01])
    hasher.update(data: left)
    hasher.update(data: right)
    return bytes(of: hasher.finalize())
  }

  /// A digest's 32 bytes, copied at once rather than element by element through its iterator.
  static func bytes(of digest: SHA256.Digest) -> Hash {
    digest.withUnsafeBytes { Array($0) }
  }

  /// The root of the tree over `leafHashes` (the hash of the empty string for no leaves).
  public static func root(_ leafHashes: ArraySlice<Hash>) -> Hash {
    switch leafHashes.count {
    case 0: return Array(SHA256.hash(data: [UInt8]()))
    case 1: return leafHashes.first!
    default:
      let k = largestPowerOfTwo(below: leafHashes.count)
      let start = leafHashes.startIndex
      return nodeHash(root(leafHashes[start..<(start + k)]), root(leafHashes[(start + k)...]))
    }
  }

  public static func root(_ leafHashes: [Hash]) -> Hash { root(leafHashes[...]) }

  /// The audit path of leaf `index` in the tree of the first `leafHashes.count` leaves (RFC 6962 PATH).
  public static func inclusionProof(index: Int, _ leafHashes: ArraySlice<Hash>) -> [Hash] {
    precondition(index >= 0 && index < leafHashes.count, "index out of range")
    if leafHashes.count == 1 { return [] }
    let k = largestPowerOfTwo(below: leafHashes.count)
    let start = leafHashes.startIndex
    let left = leafHashes[start..<(start + k)]
    let right = leafHashes[(start + k)...]
    if index < k {
      return inclusionProof(index: index, left) + [root(right)]
    }
    return inclusionProof(index: index - k, right) + [root(left)]
  }

  /// The proof that the tree of size `oldSize` is a prefix of the tree over all `leafHashes`
  /// (RFC 6962 PROOF). Empty when `oldSize` is 0 or equals the new size.
  public static func consistencyProof(oldSize: Int, _ leafHashes: ArraySlice<Hash>) -> [Hash] {
    precondition(oldSize >= 0 && oldSize <= leafHashes.count, "old size out of range")
    if oldSize == 0 || oldSize == leafHashes.count { return [] }
    return subproof(oldSize, leafHashes, complete: true)
  }

  private static func subproof(_ m: Int, _ leaves: ArraySlice<Hash>, complete: Bool) -> [Hash] {
    let n = leaves.count
    if m == n { return complete ? [] : [root(leaves)] }
    let k = largestPowerOfTwo(below: n)
    let start = leaves.startIndex
    let left = leaves[start..<(start + k)]
    let right = leaves[(start + k)...]
    if m <= k {
      return subproof(m, left, complete: complete) + [root(right)]
    }
    return subproof(m - k, right, complete: false) + [root(left)]
  }

  /// Checks an inclusion proof (RFC 9162 §2.1.3.2).
  public static func verifyInclusion(index: UInt64, treeSize: UInt64, leafHash: Hash, proof: [Hash], root: Hash) -> Bool {
    var r = leafHash
    let walked = walkInclusionProof(index: index, treeSize: treeSize, proof: proof) { p, isLeft in
      r = isLeft ? nodeHash(p, r) : nodeHash(r, p)
    }
    return walked && r == root
  }

  /// Passes each hash of an inclusion proof to `visit` with the side it joins the path on, leaf
  /// upward; false if the proof is not shaped for leaf `index` of a tree of `treeSize` leaves.
  /// The left ones are the perfect subtrees left of the leaf, one per set bit of `index`.
  static func walkInclusionProof(
    index: UInt64,
    treeSize: UInt64,
    proof: [Hash],
    visit: (_ hash: Hash, _ isLeft: Bool) -> Void
  ) -> Bool {
    guard index < treeSize else { return false }
    var fn = index
    var sn = treeSize - 1
    for p in proof {
      if sn == 0 { return false }
      if fn & 1 == 1 || fn == sn {
        visit(p, true)
        if fn & 1 == 0 { shiftUntilOddOrZero(&fn, &sn) }
      } else {
        visit(p, false)
      }
      fn >>= 1
      sn >>= 1
    }
    return sn == 0
  }

  /// Checks a consistency proof between two tree heads (RFC 9162 §2.1.4.2).
  public static func verifyConsistency(
    oldSize: UInt64,
    newSize: UInt64,
    oldRoot: Hash,
    newRoot: Hash,
    proof: [Hash]
  ) -> Bool {
    guard oldSize <= newSize else { return false }
    if oldSize == newSize { return proof.isEmpty && oldRoot == newRoot }
    if oldSize == 0 { return proof.isEmpty }
    var path = proof
    if oldSize & (oldSize - 1) == 0 { path.insert(oldRoot, at: 0) }
    guard let first = path.first else { return false }
    var fn = oldSize - 1
    var sn = newSize - 1
    while fn & 1 == 1 {
      fn >>= 1
      sn >>= 1
    }
    var fr = first
    var sr = first
    for c in path.dropFirst() {
      if sn == 0 { return false }
      if fn & 1 == 1 || fn == sn {
        fr = nodeHash(c, fr)
        sr = nodeHash(c, sr)
        if fn & 1 == 0 { shiftUntilOddOrZero(&fn, &sn) }
      } else {
        sr = nodeHash(sr, c)
      }
      fn >>= 1
      sn >>= 1
    }
    return sn == 0 && fr == oldRoot && sr == newRoot
  }

  /// RFC 9162's "right-shift fn and sn equally until LSB(fn) is set or fn is 0".
  private static func shiftUntilOddOrZero(_ fn: inout UInt64, _ sn: inout UInt64) {
    repeat {
      fn >>= 1
      sn >>= 1
    } while fn & 1 == 0 && fn != 0
  }

  /// The largest power of two strictly below `n` (n >= 2).
  static func largestPowerOfTwo(below n: Int) -> Int {
    precondition(n >= 2)
    var k = 1
    while k << 1 < n { k <<= 1 }
    return k
  }
}
