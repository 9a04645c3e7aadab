// SPDX-License-Identifier: BSL-1.0
// detail::available_cpus: how many threads this process can run at once,
// which is what hardware_threads() answers and what the default pool is
// sized by.
//
// std::thread::hardware_concurrency counts the machine's CPUs. A service in
// a container or under taskset is usually given fewer: a CPU affinity mask
// (cpusets), or a CFS quota (a Kubernetes CPU limit: 2 CPUs' worth of time
// per period on a 64-core node). A pool of 64 workers under a 2-CPU quota
// spends the quota in a fraction of each period, then all of them are
// stopped until the next one (100 ms by default), and every task queued
// meanwhile waits that long; spinning waits, sized for spare hardware
// threads, burn the quota. So this counts the CPUs of the calling thread's
// affinity mask, capped by the smallest quota of the process's cgroup and
// its ancestors (cgroup v2 cpu.max, cgroup v1 cpu.cfs_quota_us and
// cpu.cfs_period_us), rounded up: 1.5 CPUs of quota keep two threads busy
// three quarters of the time. Go sizes GOMAXPROCS by the quota since 1.25,
// also rounded up (and at least 2), but reads the process's own cgroup
// only, and misses a tighter limit on a parent (golang/go#81180).
//
// The cgroup is found as the kernel describes it: /proc/self/cgroup names
// its path in each hierarchy, /proc/self/mountinfo where each hierarchy is
// mounted and which part of it the mount shows (a container sees only its
// own subtree). Ancestors above the mount are out of sight and not read.
//
// Cost: a system call and a few small files read, once per call; callers
// keep the answer (hardware_threads() reads it once per process). Never
// throws: a limit it cannot read is no limit.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#endif

namespace weft::detail {

// A file's contents, or nothing when it cannot be read. Limit files are a
// line; /proc/self/mountinfo is a few kilobytes, more on hosts with many
// mounts.
inline std::optional<std::string> read_small_file(const std::string& path) {
#if defined(__linux__)
  struct descriptor {
    int fd;
    ~descriptor() {
      if (fd >= 0) ::close(fd);
    }
  } file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) return std::nullopt;
  std::string text;
  char buffer[4096];
  for (;;) {
    const ssize_t got = ::read(file.fd, buffer, sizeof buffer);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return std::nullopt;
    if (got == 0) return text;
    text.append(buffer, static_cast<std::size_t>(got));
  }
#else
  (void)path;
  return std::nullopt;
#endif
}

// Calls each(part) for every part of `text` between separators (a line,
// a comma-separated option, a field that may be empty), except an empty
// part after the last separator.
template <class Each>
void for_each_part(std::string_view text, char separator, Each each) {
  while (!text.empty()) {
    const auto end = std::min(text.find(separator), text.size());
    each(text.substr(0, end));
    text.remove_prefix(std::min(end + 1, text.size()));
  }
}

// The fields of a line the kernel writes with one space between fields.
inline std::vector<std::string_view> split_fields(std::string_view line) {
  std::vector<std::string_view> fields;
  for_each_part(line, ' ', [&](std::string_view field) { fields.push_back(field); });
  return fields;
}

// A decimal count without sign; nothing for anything else (v1's -1, v2's
// "max") and for zero.
inline std::optional<double> parse_positive_number(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  if (text.empty() || text.size() > 19) return std::nullopt;
  double value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  if (value <= 0) return std::nullopt;
  return value;
}

// cgroup v2 cpu.max, "<quota> <period>" in microseconds or "max <period>":
// the CPUs' worth of time per period, or nothing for no limit.
inline std::optional<double> parse_cpu_max(std::string_view text) {
  const auto fields = split_fields(text.substr(0, std::min(text.find('\n'), text.size())));
  if (fields.size() != 2) return std::nullopt;
  const auto quota = parse_positive_number(fields[0]);
  const auto period = parse_positive_number(fields[1]);
  if (!quota || !period) return std::nullopt;
  return *quota / *period;
}

// cgroup v1 cpu.cfs_quota_us (-1: no limit) and cpu.cfs_period_us.
inline std::optional<double> parse_cfs_quota(std::string_view quota_text,
                                             std::string_view period_text) {
  const auto quota = parse_positive_number(quota_text);
  const auto period = parse_positive_number(period_text);
  if (!quota || !period) return std::nullopt;
  return *quota / *period;
}

// A mountinfo path, with the octal escapes the kernel writes for a space,
// a tab, a newline and a backslash decoded.
inline std::string decode_mount_path(std::string_view escaped) {
  std::string path;
  for (std::size_t i = 0; i < escaped.size(); ++i) {
    if (escaped[i] == '\\' && i + 3 < escaped.size()) {
      const auto digit = [&](std::size_t k) {
        return escaped[i + k] >= '0' && escaped[i + k] <= '7';
      };
      if (digit(1) && digit(2) && digit(3)) {
        path += static_cast<char>((escaped[i + 1] - '0') * 64 + (escaped[i + 2] - '0') * 8 +
                                  (escaped[i + 3] - '0'));
        i += 3;
        continue;
      }
    }
    path += escaped[i];
  }
  return path;
}

// Where the CPU limits of one cgroup hierarchy are read: the process's own
// directory, then each parent up to and including the mount's.
struct cgroup_cpu_directory {
  enum class version { v1, v2 };
  version kind;
  std::string mount_point;  // the hierarchy's top, as far as this process sees it
  std::string directory;    // the process's cgroup, under mount_point
};

// The process's cgroup directory under a mount of its hierarchy that shows
// `root` of it at `mount_point`; nothing when the mount does not show it.
// A path that climbs out of what the mount shows with ".." (a process
// outside its cgroup namespace's root) is read nowhere: below the mount it
// would name a directory above it.
inline std::optional<std::string> directory_under(std::string_view root,
                                                  std::string_view mount_point,
                                                  std::string_view path) {
  const std::string shown = decode_mount_path(root);
  std::string relative;
  if (shown == "/") {
    relative = path;
  } else if (path.starts_with(shown) &&
             (path.size() == shown.size() || path[shown.size()] == '/')) {
    relative = path.substr(shown.size());
  } else {
    return std::nullopt;
  }
  bool climbs = false;
  for_each_part(relative, '/', [&](std::string_view part) { climbs = climbs || part == ".."; });
  if (climbs) return std::nullopt;
  while (!relative.empty() && relative.back() == '/') relative.pop_back();
  if (!relative.empty() && relative.front() != '/') relative.insert(relative.begin(), '/');
  const std::string top = decode_mount_path(mount_point);
  if (top == "/" && !relative.empty()) return relative;
  return top + relative;
}

// The directories to read, from the text of /proc/self/cgroup and of
// /proc/self/mountinfo: in the v2 hierarchy, and in the v1 hierarchy that
// has the cpu controller, under each mount that shows the process's
// cgroup and is not hidden by a later mount on its mount point.
inline std::vector<cgroup_cpu_directory> cgroup_cpu_directories(std::string_view proc_cgroup,
                                                                std::string_view mountinfo) {
  std::optional<std::string> v2_path;
  std::optional<std::string> v1_path;
  for_each_part(proc_cgroup, '\n', [&](std::string_view line) {
    // hierarchy-id:controller,controller:path (the path may hold colons)
    const auto first_colon = line.find(':');
    if (first_colon == std::string_view::npos) return;
    const auto second_colon = line.find(':', first_colon + 1);
    if (second_colon == std::string_view::npos) return;
    const auto id = line.substr(0, first_colon);
    const auto controllers = line.substr(first_colon + 1, second_colon - first_colon - 1);
    const std::string path{line.substr(second_colon + 1)};
    if (id == "0" && controllers.empty()) {
      v2_path = path;
      return;
    }
    for_each_part(controllers, ',', [&](std::string_view controller) {
      if (controller == "cpu") v1_path = path;
    });
  });

  std::vector<cgroup_cpu_directory> found;
  for_each_part(mountinfo, '\n', [&](std::string_view line) {
    // id parent major:minor root mount-point options [optional...] - type source super-options
    // The paths escape their spaces, and the source may be empty.
    const auto separator = line.find(" - ");
    if (separator == std::string_view::npos) return;
    const auto mount_fields = split_fields(line.substr(0, separator));
    const auto filesystem_fields = split_fields(line.substr(separator + 3));
    if (mount_fields.size() < 6 || filesystem_fields.size() < 3) return;
    const std::string_view type = filesystem_fields[0];
    const std::optional<std::string>* path = nullptr;
    auto kind = cgroup_cpu_directory::version::v2;
    if (type == "cgroup2") {
      path = &v2_path;
    } else if (type == "cgroup") {
      bool has_cpu = false;
      for_each_part(filesystem_fields[2], ',',
                    [&](std::string_view option) { has_cpu = has_cpu || option == "cpu"; });
      if (has_cpu) path = &v1_path;
      kind = cgroup_cpu_directory::version::v1;
    }
    // Any later mount on a mount point hides what was mounted there before.
    std::string top = decode_mount_path(mount_fields[4]);
    std::erase_if(found,
                  [&](const cgroup_cpu_directory& earlier) { return earlier.mount_point == top; });
    if (path == nullptr || !*path) return;
    auto directory = directory_under(mount_fields[3], mount_fields[4], **path);
    if (!directory) return;
    found.push_back({kind, std::move(top), std::move(*directory)});
  });
  return found;
}

// The smallest CPU limit set on `where.directory` and its parents up to
// the mount's top: a limit on a parent caps every cgroup below it.
inline std::optional<double> cgroup_cpu_limit(const cgroup_cpu_directory& where) {
  std::optional<double> smallest;
  std::string directory = where.directory;
  for (;;) {
    std::optional<double> limit;
    if (where.kind == cgroup_cpu_directory::version::v2) {
      if (const auto text = read_small_file(directory + "/cpu.max")) limit = parse_cpu_max(*text);
    } else {
      const auto quota = read_small_file(directory + "/cpu.cfs_quota_us");
      const auto period = read_small_file(directory + "/cpu.cfs_period_us");
      if (quota && period) limit = parse_cfs_quota(*quota, *period);
    }
    if (limit && (!smallest || *limit < *smallest)) smallest = limit;
    const auto parent_end = directory.rfind('/');
    if (directory.size() <= where.mount_point.size() || parent_end == std::string::npos) break;
    directory.erase(parent_end);
  }
  return smallest;
}

// The CPUs' worth of time per period that the process's cgroups allow, in
// every hierarchy that sets one; nothing when none does.
inline std::optional<double> cgroup_cpu_limit(std::string_view proc_cgroup,
                                              std::string_view mountinfo) {
  std::optional<double> smallest;
  for (const auto& where : cgroup_cpu_directories(proc_cgroup, mountinfo)) {
    const auto limit = cgroup_cpu_limit(where);
    if (limit && (!smallest || *limit < *smallest)) smallest = limit;
  }
  return smallest;
}

// The CPUs the calling thread's affinity mask allows: the process's under
// taskset or a container's cpuset, and the mask that the threads this one
// starts (a pool's workers) inherit.
inline std::size_t affinity_cpus() noexcept {
#if defined(__linux__)
  // The kernel refuses (EINVAL) a mask smaller than its count of possible
  // CPUs, which may be more than cpu_set_t's 1,024; 2^20 is far above any
  // kernel's limit (8,192 on x86-64), and bounds the loop.
  for (int possible = CPU_SETSIZE; possible <= (1 << 20); possible *= 2) {
    cpu_set_t* const set = CPU_ALLOC(possible);
    if (set == nullptr) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(possible);
    const int result = ::sched_getaffinity(0, bytes, set);
    const bool too_small = result != 0 && errno == EINVAL;
    const int count = result == 0 ? CPU_COUNT_S(bytes, set) : 0;
    CPU_FREE(set);
    if (count > 0) return static_cast<std::size_t>(count);
    if (!too_small) break;
  }
#endif
  return std::max(1U, std::thread::hardware_concurrency());
}

// The affinity mask's CPUs, capped by the cgroups' limit rounded up; at
// least 1.
inline std::size_t available_cpus() noexcept {
  std::size_t cpus = affinity_cpus();
  try {
    const auto proc_cgroup = read_small_file("/proc/self/cgroup");
    const auto mountinfo = read_small_file("/proc/self/mountinfo");
    if (proc_cgroup && mountinfo) {
      if (const auto limit = cgroup_cpu_limit(*proc_cgroup, *mountinfo);
          limit && *limit < static_cast<double>(cpus)) {
        cpus = static_cast<std::size_t>(std::ceil(*limit));
      }
    }
  } catch (...) {
    // Out of memory while reading (nothing else throws here): no limit is
    // known, so none is applied.
  }
  return std::max<std::size_t>(1, cpus);
}

}  // namespace weft::detail
