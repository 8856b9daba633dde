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

  @Test func leftEdgeReadOffAnInclusionProofIsTheCompactRangeBeforeTheLeaf() {
    let all = Self.leaves(70)
    for size in 1...all.count {
      var before = CompactRange()
      for index in 0..<size {
        let proof = MerkleTree.inclusionProof(index: index, all[..<size])
        let edge = CompactRange(leftOf: UInt64(index), treeSize: UInt64(size), inclusionProof: proof)
        #expect(edge == before, "leaf \(index) of \(size)")
        // The edge and the rest of the leaves re-hash to the tree's root.
        var tree = before
        tree.append(leafHashes: all[index..<size])
        #expect(tree.root == MerkleTree.root(all[..<size]))
        // A proof missing a hash has the wrong shape.
        if !proof.isEmpty {
          #expect(CompactRange(leftOf: UInt64(index), treeSize: UInt64(size), inclusionProof: Array(proof.dropLast())) == nil)
        }
        _ = before.append(leafHash: all[index])
      }
      #expect(CompactRange(leftOf: UInt64(size), treeSize: UInt64(size), inclusionProof: []) == nil)
    }
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

  /// Proofs from only the kept levels' nodes (and leaves) equal the leaf-based ones, and read
  /// nothing beyond what `inputs(for:)` listed.
  static func checkKeptLevelProofs(_ levels: StoredLevels, leafCount: Int, sizes: [Int]) {
    let all = Self.leaves(leafCount)
    let (nodes, _) = Self.storedNodes(all)
    let kept = nodes.filter { levels.keeps(level: $0.key.level) }
    #expect(kept.keys.allSatisfy { $0.level > 0 })
    for size in sizes {
      let slice = all[..<size]
      func check<Result: Equatable>(_ what: String, _ compute: ((NodeAddress) -> MerkleTree.Hash) -> Result, _ expected: Result) {
        let (wantedNodes, wantedLeaves) = levels.inputs(for: MerkleTree.nodesNeeded(compute))
        var readNodes = Set<NodeAddress>()
        var readLeaves = Set<UInt64>()
        let result = compute { address in
          levels.hash(
            address,
            node: { readNodes.insert($0); return kept[$0]! },
            leafHash: { readLeaves.insert($0); return all[Int($0)] }
          )
        }
        #expect(result == expected, "\(what), stride \(levels.stride)")
        #expect(readNodes == wantedNodes && readLeaves == wantedLeaves, "\(what) read what it listed")
        #expect(readLeaves.allSatisfy { $0 < UInt64(size) }, "\(what) read a leaf beyond its tree")
      }
      check("root of \(size)", { MerkleTree.root(treeSize: UInt64(size), node: $0) }, MerkleTree.root(slice))
      for index in Set([0, size / 3, size / 2, size - 1]) {
        check(
          "inclusion \(index) in \(size)",
          { MerkleTree.inclusionProof(index: UInt64(index), treeSize: UInt64(size), node: $0) },
          MerkleTree.inclusionProof(index: index, slice)
        )
      }
      for old in Set([1, size / 4, size / 2, size - 1, size]) where old >= 1 {
        check(
          "consistency \(old) -> \(size)",
          { MerkleTree.consistencyProof(oldSize: UInt64(old), newSize: UInt64(size), node: $0) },
          MerkleTree.consistencyProof(oldSize: old, slice)
        )
      }
    }
  }

  @Test(arguments: [1, 2, 3])
  func keptLevelProofsMatchLeafProofsExhaustively(stride: Int) {
    Self.checkKeptLevelProofs(StoredLevels(stride: stride), leafCount: 40, sizes: Array(1...40))
  }

  @Test func standardKeptLevelProofsMatchLeafProofsAcrossTiles() {
    // Sizes around the edges of 256-leaf tiles, where kept and computed levels meet.
    Self.checkKeptLevelProofs(.standard, leafCount: 1_100, sizes: [1, 2, 255, 256, 257, 511, 512, 513, 768, 1_023, 1_024, 1_025, 1_100])
  }

  @Test func standardLevelsKeepAboutOneNodePer255Leaves() {
    let levels = StoredLevels.standard
    #expect(!levels.keeps(level: 0) && !levels.keeps(level: 7) && levels.keeps(level: 8) && levels.keeps(level: 16))
    let (nodes, _) = Self.storedNodes(Self.leaves(1_024))
    #expect(nodes.keys.filter { levels.keeps(level: $0.level) }.count == 4)
    // A proof reads a bounded number of leaves: at most the 255 siblings below its first kept level
    // on each of its paths.
    let (_, leaves) = levels.inputs(for: MerkleTree.nodesNeeded { MerkleTree.inclusionProof(index: 700, treeSize: 1_024, node: $0) })
    #expect(leaves.count == 255)
  }
}
