// SPDX-License-Identifier: BSL-1.0
// weft::hardware_threads() and detail/available_cpus.hpp: the CPUs a
// process may use, from its affinity mask and its cgroups' CPU quota. The
// quota is read from files found through /proc/self/cgroup and
// /proc/self/mountinfo; these tests give it their own texts and a cgroup
// tree made of plain files in a temporary directory. (That an affinity
// mask of one CPU makes a pool of one worker is
// tests/process/hardware_threads_affinity.cpp.)
#include <weft/worker_pool.hpp>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <doctest/doctest.h>

#include <stdlib.h>  // mkdtemp

namespace {

namespace fs = std::filesystem;
using weft::detail::cgroup_cpu_directories;
using weft::detail::cgroup_cpu_directory;
using weft::detail::cgroup_cpu_limit;
using weft::detail::parse_cfs_quota;
using weft::detail::parse_cpu_max;

// A directory of its own under the system's temporary directory (made by
// mkdtemp, so never one that another run is using), removed with
// everything in it at the end of the test.
class scratch_directory {
 public:
  scratch_directory() {
    std::string name = (fs::temp_directory_path() / "weft-cgroup-test-XXXXXX").string();
    REQUIRE(::mkdtemp(name.data()) != nullptr);
    path_ = name;
  }
  scratch_directory(const scratch_directory&) = delete;
  scratch_directory& operator=(const scratch_directory&) = delete;
  ~scratch_directory() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }

  const fs::path& path() const noexcept { return path_; }

  // Writes `text` to `relative` (creating its directories).
  void write(const std::string& relative, const std::string& text) const {
    const fs::path file = path_ / relative;
    fs::create_directories(file.parent_path());
    std::ofstream{file} << text;
  }

 private:
  fs::path path_;
};

std::string mountinfo_line(const std::string& root, const std::string& mount_point,
                           const std::string& type, const std::string& super_options) {
  return "35 24 0:30 " + root + " " + mount_point + " rw,nosuid,nodev,noexec,relatime shared:9 - " +
         type + " " + type + " " + super_options + "\n";
}

// The one directory found, or how many were found when that is not one
// (so that a failed check shows it).
std::string sole_directory(std::string_view proc_cgroup, std::string_view mountinfo) {
  const auto found = cgroup_cpu_directories(proc_cgroup, mountinfo);
  if (found.size() != 1) return std::to_string(found.size()) + " directories";
  return found[0].directory;
}

}  // namespace

TEST_CASE(
    "cgroup v2 cpu.max: a quota and period give the CPUs' worth, and max, zero or garbage no "
    "limit") {
  CHECK(parse_cpu_max("200000 100000\n") == 2.0);
  CHECK(parse_cpu_max("150000 100000") == 1.5);
  CHECK(parse_cpu_max("50000 100000\n") == 0.5);
  CHECK_FALSE(parse_cpu_max("max 100000\n"));
  CHECK_FALSE(parse_cpu_max("0 100000\n"));
  CHECK_FALSE(parse_cpu_max("100000\n"));
  CHECK_FALSE(parse_cpu_max("-1 100000\n"));
  CHECK_FALSE(parse_cpu_max(""));
  CHECK_FALSE(parse_cpu_max("200000 100000 7\n"));
}

TEST_CASE("cgroup v1 cfs quota: -1 is no limit, and a quota over its period is the CPUs' worth") {
  CHECK(parse_cfs_quota("300000\n", "100000\n") == 3.0);
  CHECK(parse_cfs_quota("25000\n", "100000\n") == 0.25);
  CHECK_FALSE(parse_cfs_quota("-1\n", "100000\n"));
  CHECK_FALSE(parse_cfs_quota("100000\n", "0\n"));
  CHECK_FALSE(parse_cfs_quota("", "100000\n"));
}

TEST_CASE("mountinfo paths: the kernel's octal escapes are decoded, other backslashes kept") {
  using weft::detail::decode_mount_path;
  CHECK(decode_mount_path("/sys/fs/cgroup") == "/sys/fs/cgroup");
  CHECK(decode_mount_path("/mnt/a\\040b") == "/mnt/a b");
  CHECK(decode_mount_path("/mnt/tab\\011\\134x") == "/mnt/tab\t\\x");
  CHECK(decode_mount_path("/mnt/short\\04") == "/mnt/short\\04");
  CHECK(decode_mount_path("/mnt/not\\089") == "/mnt/not\\089");
}

TEST_CASE(
    "cgroup directories: a v2 hierarchy mounted whole is read at the process's path under it") {
  const auto found = cgroup_cpu_directories(
      "0::/kubepods/pod7/c1\n", mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw,nsdelegate"));
  REQUIRE(found.size() == 1);
  CHECK(found[0].kind == cgroup_cpu_directory::version::v2);
  CHECK(found[0].mount_point == "/sys/fs/cgroup");
  CHECK(found[0].directory == "/sys/fs/cgroup/kubepods/pod7/c1");
}

TEST_CASE(
    "cgroup directories: in a cgroup namespace, or a container shown its own subtree, the path is "
    "relative to what the mount shows") {
  SUBCASE("namespace: the process is at the root it sees") {
    CHECK(sole_directory("0::/\n", mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup");
  }
  SUBCASE("a subtree mounted: the part of the path the mount shows is dropped") {
    CHECK(sole_directory("0::/kubepods/pod7/c1\n",
                         mountinfo_line("/kubepods/pod7", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup/c1");
  }
  SUBCASE("a path outside the subtree (a sibling whose name starts the same) is read nowhere") {
    CHECK(
        cgroup_cpu_directories("0::/kubepods/pod77\n",
                               mountinfo_line("/kubepods/pod7", "/sys/fs/cgroup", "cgroup2", "rw"))
            .empty());
  }
  SUBCASE("a path above the namespace's root is read nowhere") {
    CHECK(cgroup_cpu_directories("0::/../sibling\n",
                                 mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw"))
              .empty());
    CHECK(cgroup_cpu_directories("0::/a/../../b\n",
                                 mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw"))
              .empty());
  }
  SUBCASE("a root the mount shows that itself has \"..\" is matched as it is written") {
    CHECK(sole_directory("0::/../sibling/x\n",
                         mountinfo_line("/../sibling", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup/x");
  }
}

TEST_CASE(
    "cgroup directories: of several mounts, each that shows the process's cgroup, and of mounts on "
    "one mount point the last") {
  SUBCASE("a mount covered by a later one on the same mount point is out of sight") {
    CHECK(sole_directory("0::/user.slice/app\n",
                         mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw") +
                             mountinfo_line("/user.slice", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup/app");
  }
  SUBCASE("a mount that shows the process, covered by one of another subtree, is read nowhere") {
    // The directory the first mount names is now inside the second, whose
    // quota is another pod's.
    CHECK(cgroup_cpu_directories(
              "0::/kubepods/podB/c\n",
              mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw") +
                  mountinfo_line("/kubepods/podA", "/sys/fs/cgroup", "cgroup2", "rw"))
              .empty());
    // A later mount of any kind hides it as well.
    CHECK(
        cgroup_cpu_directories("0::/app\n", mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw") +
                                                "50 35 0:40 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
            .empty());
  }
  SUBCASE("a mount of another subtree is passed over for one that shows the process") {
    CHECK(sole_directory("0::/kubepods/pod7/c1\n",
                         mountinfo_line("/system.slice", "/run/other", "cgroup2", "rw") +
                             mountinfo_line("/kubepods", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup/pod7/c1");
  }
  SUBCASE("two mounts in sight that show it: both are read") {
    const auto found = cgroup_cpu_directories(
        "0::/app\n", mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw") +
                         mountinfo_line("/", "/mnt/cgroup", "cgroup2", "rw"));
    REQUIRE(found.size() == 2);
    CHECK(found[0].directory == "/sys/fs/cgroup/app");
    CHECK(found[1].directory == "/mnt/cgroup/app");
  }
}

TEST_CASE(
    "cgroup directories: paths with colons and spaces, a mount on the root, and a mount with no "
    "source") {
  SUBCASE("the cgroup path is everything after the second colon, spaces included") {
    CHECK(sole_directory("0::/svc:a/with space\n",
                         mountinfo_line("/", "/sys/fs/cgroup", "cgroup2", "rw")) ==
          "/sys/fs/cgroup/svc:a/with space");
  }
  SUBCASE("a hierarchy mounted on / gives the path itself, and / for the root cgroup") {
    CHECK(sole_directory("0::/a/b\n", mountinfo_line("/", "/", "cgroup2", "rw")) == "/a/b");
    CHECK(sole_directory("0::/\n", mountinfo_line("/", "/", "cgroup2", "rw")) == "/");
  }
  SUBCASE("an empty source field keeps the super options in their place") {
    const auto found = cgroup_cpu_directories(
        "3:cpu:/docker/abc\n", "40 30 0:35 / /sys/fs/cgroup/cpu rw,relatime - cgroup  rw,cpu\n");
    REQUIRE(found.size() == 1);
    CHECK(found[0].kind == cgroup_cpu_directory::version::v1);
    CHECK(found[0].directory == "/sys/fs/cgroup/cpu/docker/abc");
  }
}

TEST_CASE(
    "cgroup directories: v1 is read in the hierarchy with the cpu controller, not cpuset's or "
    "cpuacct's alone, beside v2's") {
  const std::string proc_cgroup =
      "4:cpu,cpuacct:/docker/abc\n"
      "12:cpuset:/cpusets/abc\n"
      "11:cpuacct:/accounting/abc\n"
      "1:name=systemd:/docker/abc\n"
      "0::/docker/abc\n";
  const std::string mountinfo =
      mountinfo_line("/", "/sys/fs/cgroup/cpuset", "cgroup", "rw,cpuset") +
      mountinfo_line("/", "/sys/fs/cgroup/cpuacct", "cgroup", "rw,cpuacct") +
      mountinfo_line("/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct") +
      mountinfo_line("/", "/sys/fs/cgroup/unified", "cgroup2", "rw") +
      "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n";
  const auto found = cgroup_cpu_directories(proc_cgroup, mountinfo);
  REQUIRE(found.size() == 2);
  CHECK(found[0].kind == cgroup_cpu_directory::version::v1);
  CHECK(found[0].directory == "/sys/fs/cgroup/cpu,cpuacct/docker/abc");
  CHECK(found[1].kind == cgroup_cpu_directory::version::v2);
  CHECK(found[1].directory == "/sys/fs/cgroup/unified/docker/abc");
}

TEST_CASE(
    "cgroup directories: none without a cgroup hierarchy mounted, or with texts that are not the "
    "kernel's") {
  CHECK(cgroup_cpu_directories("0::/\n", "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n").empty());
  CHECK(cgroup_cpu_directories("", "").empty());
  CHECK(cgroup_cpu_directories("garbage\n", "garbage - with a dash\n").empty());
  CHECK(cgroup_cpu_directories("0::/\n", "35 24 0:30 / /sys/fs/cgroup rw - cgroup2\n").empty());
}

TEST_CASE(
    "cgroup CPU limit: the smallest quota of the cgroup and its parents up to the mount, none "
    "above it") {
  const scratch_directory tree;
  const std::string escaped_top = tree.path().string() + "/mount\\040with\\040space";
  tree.write("mount with space/cpu.max", "100000 100000\n");  // the mount's top: read
  tree.write("mount with space/kubepods/cpu.max", "max 100000\n");
  tree.write("mount with space/kubepods/pod7/cpu.max", "250000 100000\n");
  tree.write("mount with space/kubepods/pod7/c1/cpu.max", "max 100000\n");
  tree.write("cpu.max", "10000 100000\n");  // above the mount: never read
  const std::string mountinfo = mountinfo_line("/", escaped_top, "cgroup2", "rw");
  const auto limit = [&] { return cgroup_cpu_limit("0::/kubepods/pod7/c1\n", mountinfo); };

  SUBCASE("the whole hierarchy: the top's 1 CPU is the smallest") { CHECK(limit() == 1.0); }
  SUBCASE("the top sets none: the pod's 2.5 CPUs") {
    tree.write("mount with space/cpu.max", "max 100000\n");
    CHECK(limit() == 2.5);
  }
  SUBCASE("the cgroup's own quota is smaller than its parent's: the cgroup's") {
    tree.write("mount with space/cpu.max", "max 100000\n");
    tree.write("mount with space/kubepods/pod7/c1/cpu.max", "50000 100000\n");
    CHECK(limit() == 0.5);
  }
  SUBCASE("no quota anywhere: no limit") {
    tree.write("mount with space/cpu.max", "max 100000\n");
    tree.write("mount with space/kubepods/pod7/cpu.max", "max 100000\n");
    CHECK_FALSE(limit());
  }
  SUBCASE("a directory that does not exist limits nothing") {
    CHECK(cgroup_cpu_limit("0::/elsewhere\n", mountinfo) == 1.0);
  }
}

TEST_CASE("cgroup CPU limit: v1's quota counts, and the smaller of v1's and v2's wins") {
  const scratch_directory tree;
  const std::string v1 = tree.path().string() + "/cpu,cpuacct";
  const std::string v2 = tree.path().string() + "/unified";
  tree.write("cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  tree.write("cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  tree.write("cpu,cpuacct/docker/cpu.cfs_quota_us", "300000\n");
  tree.write("cpu,cpuacct/docker/cpu.cfs_period_us", "100000\n");
  tree.write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
  tree.write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  const std::string proc_cgroup = "4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n";
  const std::string mountinfo = mountinfo_line("/", v1, "cgroup", "rw,cpu,cpuacct") +
                                mountinfo_line("/", v2, "cgroup2", "rw");

  SUBCASE("v1 alone sets one (hybrid hosts: v2 has no cpu controller)") {
    CHECK(cgroup_cpu_limit(proc_cgroup, mountinfo) == 3.0);
  }
  SUBCASE("v2 sets a smaller one") {
    tree.write("unified/docker/abc/cpu.max", "120000 100000\n");
    CHECK(cgroup_cpu_limit(proc_cgroup, mountinfo) == 1.2);
  }
  SUBCASE("v2 sets a larger one") {
    tree.write("unified/docker/abc/cpu.max", "500000 100000\n");
    CHECK(cgroup_cpu_limit(proc_cgroup, mountinfo) == 3.0);
  }
  SUBCASE("a quota without its period is no limit") {
    fs::remove(tree.path() / "cpu,cpuacct/docker/cpu.cfs_period_us");
    CHECK_FALSE(cgroup_cpu_limit(proc_cgroup, mountinfo));
  }
}

TEST_CASE("hardware_threads: at least one, and what this process's affinity and cgroups allow") {
  const std::size_t threads = weft::hardware_threads();
  CHECK(threads >= 1);
  CHECK(threads <= weft::detail::affinity_cpus());
  CHECK(threads == weft::detail::available_cpus());
  // A quota on this process's cgroup, if it has one, caps it rounded up.
  const auto proc_cgroup = weft::detail::read_small_file("/proc/self/cgroup");
  const auto mountinfo = weft::detail::read_small_file("/proc/self/mountinfo");
  if (proc_cgroup && mountinfo) {
    if (const auto limit = cgroup_cpu_limit(*proc_cgroup, *mountinfo)) {
      CHECK(static_cast<double>(threads) < *limit + 1);
    }
  }
  weft::worker_pool_options defaults;
  CHECK(defaults.workers == threads);
}
