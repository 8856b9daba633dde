import Foundation
import Testing

import TollgateCertificates

@Suite struct PEMFilesTests {
  func withDirectory(_ body: (String) throws -> Void) throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tollgate-pem-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try body(directory)
  }

  func mode(_ path: String) throws -> Int {
    (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as! NSNumber).intValue
  }

  @Test func aSecretIsTheOwnersAloneAndReplacesTheOldFileWhole() throws {
    try withDirectory { directory in
      let path = directory + "/client.key"
      try PEMFiles.write("first\n", to: path, secret: true)
      #expect(try mode(path) == 0o600)
      #expect(try String(contentsOfFile: path, encoding: .utf8) == "first\n")

      // Over a file anyone could read: the new one is the owner's alone.
      try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: path)
      let long = String(repeating: "k", count: 200_000)
      try PEMFiles.write(long, to: path, secret: true)
      #expect(try mode(path) == 0o600)
      #expect(try String(contentsOfFile: path, encoding: .utf8) == long)
      // No temporary file is left beside it.
      #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["client.key"])
    }
  }

  @Test func aPublicFileIsReadableByAll() throws {
    try withDirectory { directory in
      let path = directory + "/client.pem"
      try PEMFiles.write("cert\n", to: path)
      #expect(try mode(path) == 0o644)
    }
  }

  @Test func anUnwritableDestinationIsAClearErrorAndLeavesNothing() throws {
    try withDirectory { directory in
      let path = directory + "/missing/client.key"
      do {
        try PEMFiles.write("k", to: path, secret: true)
        Issue.record("wrote into a folder that does not exist")
      } catch let error as PEMFiles.WriteError {
        #expect(error.description.contains(path))
        #expect(error.description.contains("No such file"))
      }
      #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }
  }
}
