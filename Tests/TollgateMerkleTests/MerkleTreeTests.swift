import Crypto
import Foundation
import Testing
import TollgateMerkle

@Suite struct MerkleTreeTests {
  /// The test leaves of certificate-transparency's merkle_tree_test.
  static let leaves: [[UInt8]] = [
    [], [0x00], [0x10], [0x20, 0x21], [0x30, 0x31], [0x40, 0x41, 0x42, 0x43],
    [0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
    [0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
  ]

  /// Their published roots for sizes 1 to 8.
  static let roots = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
  ]

  static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

  @Test func knownRoots() {
    let hashes = Self.leaves.map { MerkleTree.leafHash($0) }
    for size in 1...8 {
      #expect(Self.hex(MerkleTree.root(hashes[0..<size])) == Self.roots[size - 1], "size \(size)")
    }
    #expect(Self.hex(MerkleTree.root([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
  }

  /// Leaves held contiguously are hashed in place; any other sequence of bytes must hash the same.
  @Test func leafHashDoesNotDependOnHowTheBytesAreHeld() {
    for leaf in Self.leaves {
      #expect(MerkleTree.leafHash(leaf.lazy.map { $0 }) == MerkleTree.leafHash(leaf))
      #expect(MerkleTree.leafHash(leaf[...]) == MerkleTree.leafHash(leaf))
    }
  }

  static func hashes(_ n: Int) -> [MerkleTree.Hash] {
    (0..<n).map { MerkleTree.leafHash(Array("leaf-\($0)".utf8)) }
  }

  @Test func everyInclusionProofVerifiesAndTamperingFails() {
    for size in 1...40 {
      let leaves = Self.hashes(size)
      let root = MerkleTree.root(leaves)
      for index in 0..<size {
        let proof = MerkleTree.inclusionProof(index: index, leaves[...])
        #expect(
          MerkleTree.verifyInclusion(index: UInt64(index), treeSize: UInt64(size), leafHash: leaves[index], proof: proof, root: root)
        )
        let wrongLeaf = MerkleTree.leafHash(Array("other".utf8))
        #expect(
          !MerkleTree.verifyInclusion(index: UInt64(index), treeSize: UInt64(size), leafHash: wrongLeaf, proof: proof, root: root)
        )
        if size > 1 {
          let wrongIndex = UInt64((index + 1) % size)
          #expect(
            !MerkleTree.verifyInclusion(index: wrongIndex, treeSize: UInt64(size), leafHash: leaves[index], proof: proof, root: root)
          )
        }
      }
    }
  }

  @Test func everyConsistencyProofVerifiesAndForksFail() {
    for newSize in 1...33 {
      let leaves = Self.hashes(newSize)
      let newRoot = MerkleTree.root(leaves)
      for oldSize in 1...newSize {
        let oldRoot = MerkleTree.root(leaves[0..<oldSize])
        let proof = MerkleTree.consistencyProof(oldSize: oldSize, leaves[...])
        #expect(
          MerkleTree.verifyConsistency(
            oldSize: UInt64(oldSize), newSize: UInt64(newSize), oldRoot: oldRoot, newRoot: newRoot, proof: proof
          ),
          "\(oldSize) -> \(newSize)"
        )
        // A log that rewrote history (a different leaf inside the old tree) is caught.
        if oldSize < newSize {
          var forked = leaves
          forked[oldSize - 1] = MerkleTree.leafHash(Array("rewritten".utf8))
          #expect(
            !MerkleTree.verifyConsistency(
              oldSize: UInt64(oldSize), newSize: UInt64(newSize), oldRoot: oldRoot, newRoot: MerkleTree.root(forked),
              proof: MerkleTree.consistencyProof(oldSize: oldSize, forked[...])
            )
          )
        }
      }
    }
  }
}

@Suite struct SignedNoteTests {
  @Test func signsAndVerifiesCheckpoints() throws {
    let key = Curve25519.Signing.PrivateKey()
    let checkpoint = Checkpoint(origin: "tollgate/example.org/acme", treeSize: 42, rootHash: Array(repeating: 7, count: 32))
    let note = try NoteSignature.sign(body: checkpoint.body, keyName: "tollgate-2026", key: key)
    let publicKey = Array(key.publicKey.rawRepresentation)
    let body = try NoteSignature.verify(note: note, keyName: "tollgate-2026", publicKey: publicKey)
    #expect(Checkpoint(body: body) == checkpoint)
    #expect(note.hasPrefix("tollgate/example.org/acme\n42\n"))

    let tampered = note.replacingOccurrences(of: "\n42\n", with: "\n43\n")
    #expect(throws: NoteSignature.Failure.badSignature) {
      try NoteSignature.verify(note: tampered, keyName: "tollgate-2026", publicKey: publicKey)
    }
    let otherKey = Array(Curve25519.Signing.PrivateKey().publicKey.rawRepresentation)
    #expect(throws: NoteSignature.Failure.noSignatureByKey("tollgate-2026")) {
      try NoteSignature.verify(note: note, keyName: "tollgate-2026", publicKey: otherKey)
    }
  }
}
