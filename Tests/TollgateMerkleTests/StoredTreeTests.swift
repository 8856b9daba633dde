import Testing
import TollgateMerkle

@Suite struct StoredTreeTests {
  /// Every perfect subtree of `leaves`, as a store would hold them after appending them all.
  static func storedNodes(_ leaves: [MerkleTree.Hash]) -> ([NodeAddress: MerkleTree.Hash], CompactRange) {
    var range = CompactRange()
    var nodes: [NodeAddress: MerkleTree.Hash] = [:]
    for leaf in leaves {
      for (address, hash) in range.append(leafHash: leaf) { nodes[address] = hash }
    }
    return (nodes, range)
  }

  static func leaves(_ n: Int) -> [MerkleTree.Hash] {
    (0..<n).map { MerkleTree.leafHash(Array("leaf \($0)".utf8)) }
  }

  @Test func compactRangeRootMatchesFullTreeAtEverySize() {
    let all = Self.leaves(70)
    var range = CompactRange()
    #expect(range.root == MerkleTree.root([]))
    for (i, leaf) in all.enumerated() {
      _ = range.append(leafHash: leaf)
      #expect(range.root == MerkleTree.root(all[..<(i + 1)]), "size \(i + 1)")
      #expect(CompactRange(size: range.size, hashes: range.hashes) == range)
    }
    #expect(CompactRange(size: 3, hashes: [range.hashes[0]]) == nil)
  }

  @Test func storedNodeProofsMatchLeafProofsExhaustively() {
    let all = Self.leaves(40)
    let (nodes, _) = Self.storedNodes(all)
    let lookup: (NodeAddress) -> MerkleTree.Hash = { nodes[$0]! }
    for size in 1...all.count {
      let slice = all[..<size]
      #expect(MerkleTree.root(treeSize: UInt64(size), node: lookup) == MerkleTree.root(slice))
      for index in 0..<size {
        #expect(
          MerkleTree.inclusionProof(index: UInt64(index), treeSize: UInt64(size), node: lookup)
            == MerkleTree.inclusionProof(index: index, slice),
          "inclusion \(index) in \(size)"
        )
      }
      for old in 0...size {
        #expect(
          MerkleTree.consistencyProof(oldSize: UInt64(old), newSize: UInt64(size), node: lookup)
            == MerkleTree.consistencyProof(oldSize: old, slice),
          "consistency \(old) -> \(size)"
        )
      }
    }
  }

  @Test func nodesNeededIsExactlyWhatAProofReads() {
    let all = Self.leaves(37)
    let (nodes, _) = Self.storedNodes(all)
    let needed = MerkleTree.nodesNeeded { node in
      _ = MerkleTree.consistencyProof(oldSize: 13, newSize: 37, node: node)
    }
    var read = Set<NodeAddress>()
    _ = MerkleTree.consistencyProof(oldSize: 13, newSize: 37) { address in
      read.insert(address)
      return nodes[address]!
    }
    #expect(needed == read)
    // Logarithmic, not linear, in the tree size.
    #expect(needed.count < 20)
  }
}
