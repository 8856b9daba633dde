/// The release this build is, reported by `tollgate --version`, metrics and `tollctl status`.
public enum TollgateVersion {
  public static let current = "0.6.0"
}
